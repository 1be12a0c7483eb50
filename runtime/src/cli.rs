//! What the two command-line tools (`v3r` here, `v3c` in the compiler) share: log set-up,
//! one-line usage errors, and reading token ids from a flag.
//!
//! Logging: warnings by default, `-v` info, `-vv` debug, `-vvv` trace; `V3C_LOG` (an env-filter
//! string such as `v3c_compiler=debug`) overrides. Usage errors (unknown flag, bad value, missing
//! argument) print ONE line naming the problem and exit with code 2; `--help` and `--version` print
//! as usual and exit 0.

use std::process::exit;

/// Parses the process arguments into `C`, turning any usage error into one line on stderr and
/// exit code 2.
pub fn parse_or_exit<C: clap::Parser>(tool: &str) -> C {
    let parsed =
        negative_numbers(C::command()).try_get_matches().and_then(|mut matches| C::from_arg_matches_mut(&mut matches));
    match parsed {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(e.kind(), DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand) {
                e.exit();
            }
            // clap renders "error: ...", maybe a list of missing arguments, a tip, then Usage: ...;
            // keep everything before the usage block, folded into one line.
            let rendered = e.render().to_string();
            let parts: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let joined = parts.join(" ");
            let first = joined.strip_prefix("error: ").unwrap_or(&joined);
            eprintln!("{tool}: error: {first} (see '{tool} --help')");
            exit(2);
        }
    }
}

/// `cmd` with every value-taking flag of it and its subcommands reading `-1` as its value, not
/// as a flag: `--temperature -1` is then refused by what checks the value ("must be >= 0"), not
/// as an unexpected argument.
fn negative_numbers(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| if a.get_action().takes_values() { a.allow_negative_numbers(true) } else { a })
        .mut_subcommands(negative_numbers)
}

/// `N` of a flag that counts something there must be at least one of (`--reps`, `--max-rows`).
pub fn positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The most rows or cache rows a plan may be sized for (`v3c compile --max-rows`,
/// `--max-batch`, `--max-context`): 2^24. Far beyond what any device holds at a real model's
/// widths (a DeepSeek-V3 prefill of that many rows needs terabytes of activations), and small
/// enough that every byte count of a plan fits in 64 bits.
pub const MAX_PLAN_ROWS: usize = 1 << 24;

/// `N` of a flag sizing a plan: at least 1, at most [`MAX_PLAN_ROWS`].
pub fn plan_rows(text: &str) -> Result<usize, String> {
    match positive(text)? {
        n if n > MAX_PLAN_ROWS => Err(format!("must be at most {MAX_PLAN_ROWS} (2^24)")),
        n => Ok(n),
    }
}

/// Installs the global log subscriber writing to stderr. Calling it twice is harmless.
pub fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = std::env::var("V3C_LOG")
        .ok()
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(verbosity >= 2)
        .try_init();
}

/// Parses token ids separated by whitespace ("3 17 250"); `flag` names the source in errors, which
/// quote the offending word.
pub fn parse_token_ids(text: &str, flag: &str) -> Result<Vec<u32>, String> {
    let ids = text
        .split_whitespace()
        .map(|w| {
            w.parse::<u32>().map_err(|_| {
                format!("{flag}: '{w}' is not a token id (expected non-negative integers separated by spaces)")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err(format!("{flag}: no token ids given"));
    }
    Ok(ids)
}

/// Prompts from `path`, one a line of token ids (blank lines skipped); errors name the file and
/// line.
pub fn read_prompts(path: &std::path::Path) -> Result<Vec<Vec<u32>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let prompts = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_token_ids(l, &format!("{}:{}", path.display(), i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    if prompts.is_empty() {
        return Err(format!("{}: no prompts (one line of token ids each)", path.display()));
    }
    Ok(prompts)
}

/// Sampling settings a command takes: `--temperature` at least 0, `--top-p` in (0, 1].
pub fn check_sampling(temperature: f32, top_p: f32) -> Result<(), String> {
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(format!("top-p {top_p} must be in (0, 1]"));
    }
    if temperature < 0.0 || !temperature.is_finite() {
        return Err(format!("temperature {temperature} must be >= 0"));
    }
    Ok(())
}

/// Top-k, min-p and the penalties, as flags (`v3c run`; `v3r run`, `serve`, `chat`).
#[derive(clap::Args, Debug, Clone)]
pub struct ShapingArgs {
    /// Sample only among the K most probable tokens (0: no limit).
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_k: usize,
    /// Sample only among tokens at least P times as probable as the most probable one (0: no
    /// limit; applied after top-k and top-p, as transformers does).
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    min_p: f32,
    /// Divide the logit of each token already in the prompt or the output by R (multiply it when
    /// negative); > 1 discourages repeats (transformers' and vLLM's; 1: off).
    #[arg(long, value_name = "R", default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtract X from the logit of each token already generated (OpenAI's, in [-2, 2]).
    #[arg(long, value_name = "X", default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtract X from the logit of each token already generated, as many times as it was
    /// generated (OpenAI's, in [-2, 2]).
    #[arg(long, value_name = "X", default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Add BIAS, in [-100, 100], to token ID's logit before the sampling (OpenAI's logit_bias;
    /// the flag repeated for more tokens): -100 all but bans a token, 100 all but forces it.
    #[arg(long, value_name = "ID=BIAS", value_parser = token_bias)]
    logit_bias: Vec<(u32, f32)>,
    /// Hold the completion to one JSON object (OpenAI's response_format json_object).
    #[arg(long, group = "guided")]
    json: bool,
    /// Hold the completion to a JSON schema (a file; its properties generated in order, those not
    /// required there or not), ended by the end token.
    #[arg(long, value_name = "FILE", group = "guided")]
    json_schema: Option<std::path::PathBuf>,
    /// Hold the completion to a regular expression, matched whole, ended by the end token.
    #[arg(long, value_name = "REGEX", group = "guided")]
    guided_regex: Option<String>,
    /// Make the completion one of these strings (the flag repeated), ended by the end token.
    #[arg(long, value_name = "TEXT", group = "guided")]
    guided_choice: Vec<String>,
    /// Hold the completion to a context-free grammar (a file in GBNF, llama.cpp's EBNF: `root ::=
    /// ...`), a sentence of it ended by the end token.
    #[arg(long, value_name = "FILE", group = "guided")]
    guided_grammar: Option<std::path::PathBuf>,
}

impl ShapingArgs {
    /// What `--json`, `--json-schema`, `--guided-regex`, `--guided-choice` or `--guided-grammar`
    /// hold the completion to, through `tokenizer` (the token's bytes), ended by `eos` (None:
    /// none asked for).
    pub fn constraint(
        &self,
        tokenizer: Option<&std::sync::Arc<crate::tokenizer::Tokenizer>>,
        eos: Option<u32>,
    ) -> Result<Option<Box<dyn v3c_models::sampling::Constraint>>, String> {
        if let Some(file) = &self.guided_grammar {
            let at = |e: String| format!("--guided-grammar {}: {e}", file.display());
            let text = std::fs::read_to_string(file).map_err(|e| at(e.to_string()))?;
            return grammar_constraint(&text, tokenizer, eos).map(Some).map_err(at);
        }
        let (flag, guide) = match (&self.json_schema, &self.guided_regex, self.guided_choice.is_empty()) {
            _ if self.json => (String::from("--json"), None),
            (Some(file), _, _) => {
                let at = |e: String| format!("--json-schema {}: {e}", file.display());
                let text = std::fs::read_to_string(file).map_err(|e| at(e.to_string()))?;
                let schema: serde_json::Value = serde_json::from_str(&text).map_err(|e| at(e.to_string()))?;
                ("--json-schema".into(), Some(Guide::of_schema(&schema).map_err(at)?))
            }
            (None, Some(r), _) => ("--guided-regex".into(), Some(Guide::Regex(r.clone()))),
            (None, None, false) => {
                ("--guided-choice".into(), Some(Guide::Regex(crate::grammar::choice_regex(&self.guided_choice))))
            }
            (None, None, true) => return Ok(None),
        };
        let Some(guide) = guide else {
            let t = tokenizer.ok_or("--json: needs a tokenizer (--tokenizer FILE, or tokenizer.json in --weights)")?;
            return Ok(Some(Box::new(crate::grammar::JsonConstraint::new(t, eos))));
        };
        let eos_flag = |e: String| e.replace("(not ignore_eos)", "(not --ignore-eos)");
        guide.constraint(tokenizer, eos).map(Some).map_err(|e| format!("{flag}: {}", eos_flag(e)))
    }

    /// Whether a constraint is asked for (a tokenizer is needed).
    pub fn guided(&self) -> bool {
        self.json
            || self.json_schema.is_some()
            || self.guided_regex.is_some()
            || !self.guided_choice.is_empty()
            || self.guided_grammar.is_some()
    }

    pub fn shaping(&self) -> v3c_models::sampling::Shaping {
        v3c_models::sampling::Shaping {
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            ..Default::default()
        }
    }
}

/// `--logit-bias ID=BIAS`.
fn token_bias(text: &str) -> Result<(u32, f32), String> {
    let (id, bias) = text.split_once('=').ok_or_else(|| format!("{text}: expected ID=BIAS (e.g. 128798=-100)"))?;
    let id = id.trim().parse::<u32>().map_err(|_| format!("{id}: not a token id"))?;
    let bias = bias.trim().parse::<f32>().map_err(|_| format!("{bias}: not a number"))?;
    Ok((id, bias))
}

/// What a request to `v3r serve` leaves out: the command line's flags.
#[derive(Debug, Clone)]
pub struct RequestDefaults {
    pub max_new: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Top-k, min-p and the penalties (a request's own replace them one by one).
    pub shaping: v3c_models::sampling::Shaping,
    /// The end token, which a structured output ends with ([`crate::grammar`]).
    pub eos: Option<u32>,
    /// Chats' completions part into reasoning and answer ([`crate::reasoning`]: DeepSeek-R1's).
    pub reasoning: bool,
    /// How the model writes tool calls ([`crate::tools`]).
    pub tool_format: crate::tools::ToolFormat,
}

#[cfg(test)]
impl RequestDefaults {
    /// What tests start from: greedy, 16 new tokens, no end token, no reasoning.
    pub(crate) fn for_tests() -> RequestDefaults {
        RequestDefaults {
            max_new: 16,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            shaping: Default::default(),
            eos: None,
            reasoning: false,
            tool_format: Default::default(),
        }
    }
}

/// A line of `v3r serve`'s input that cancels a request: `{"cancel": ID}`, ID a request's id (its
/// own, or its line's number). None: not such a line.
pub fn parse_cancel(line: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let o = v.as_object().filter(|o| o.len() == 1)?;
    o.get("cancel").cloned()
}

/// One line of `v3r serve`'s input: token ids separated by spaces, or a JSON object
/// `{"prompt": [ids] or "ids", "max_new_tokens": N, "temperature": T, "top_p": P, "seed": S,
/// "top_k": K, "min_p": P, "repetition_penalty": R, "presence_penalty": X, "frequency_penalty": X,
/// "logit_bias": {"id": bias, ...} (see [`v3c_models::sampling`]),
/// "stop": [[ids], ...] or [ids] or "ids", "logprobs": true|false, "top_logprobs": K, "echo": true (the prompt
/// given back; with logprobs, its tokens scored too), "id": anything}` (all but the
/// prompt optional, from `defaults`). With a tokenizer, also `"text": "..."` (the prompt as text,
/// its template's special tokens added), `"messages": [{"role": ..., "content": ...}, ...]` (a
/// conversation, written by the chat template with the assistant's turn opened) and `"stop_text":
/// "..." or ["...", ...]` (stop strings).
/// Returns the request's id (when it gives one) and the request.
pub fn parse_request(
    line: &str,
    defaults: &RequestDefaults,
    tokenizer: Option<&std::sync::Arc<crate::tokenizer::Tokenizer>>,
) -> Result<(Option<serde_json::Value>, crate::session::Request), String> {
    let d = defaults;
    let line = line.trim();
    if !line.starts_with('{') {
        let prompt = parse_token_ids(line, "prompt")?;
        let sampler = v3c_models::reference::Sampler::new(d.temperature, d.top_p, d.seed).shaped(d.shaping.clone());
        return Ok((None, crate::session::Request::new(prompt, d.max_new, sampler)));
    }
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not a JSON request: {e}"))?;
    let o = v.as_object().ok_or("a request is a JSON object")?;
    const FIELDS: [&str; 13] = [
        "prompt",
        "text",
        "messages",
        "echo",
        "max_new_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stop_text",
        "logprobs",
        "top_logprobs",
        "id",
    ];
    let known: Vec<&str> = FIELDS.iter().chain(&CHAT_FIELDS).chain(&SAMPLING_FIELDS).copied().collect();
    if let Some(k) = o.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown field '{k}' ({})", known.join(", ")));
    }
    let tokenizer_for = |field: &str| {
        tokenizer.ok_or_else(|| {
            format!("{field}: text needs a tokenizer (--tokenizer FILE, or tokenizer.json in --weights)")
        })
    };
    let given: Vec<&str> = ["prompt", "text", "messages"].into_iter().filter(|k| o.contains_key(*k)).collect();
    if given.len() > 1 {
        return Err(format!(
            "{}: one prompt a request",
            given.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(" and ")
        ));
    }
    // OpenAI's tools, which the chat template describes and the completion may call.
    let tools = match (tokenizer, o.get("messages")) {
        (Some(t), Some(_)) => {
            crate::tools::Tools::parse(o.get("tools"), o.get("tool_choice"), o.get("parallel_tool_calls"), t)?
                .map(|tools| tools.written_as(d.tool_format))
        }
        _ => match CHAT_FIELDS.iter().find(|k| o.contains_key(**k)) {
            Some(k) => return Err(format!("{k}: only with \"messages\" (a chat) and a tokenizer")),
            None => None,
        },
    };
    for (name, why) in tools.iter().flat_map(|t| &t.loose) {
        tracing::warn!("tools: {name}'s arguments are held to any JSON object only ({why})");
    }
    let prompt = match (o.get("prompt"), o.get("text"), o.get("messages")) {
        (_, Some(serde_json::Value::String(text)), _) => {
            let ids = tokenizer_for("text")?.encode(text, true);
            if ids.is_empty() {
                return Err("text: no tokens (an empty text, and a template that adds none)".into());
            }
            ids
        }
        (_, Some(x), _) => return Err(format!("text: {x} is not a string")),
        // A conversation, the assistant's turn opened.
        (_, _, Some(messages)) => {
            let kwargs = match o.get("chat_template_kwargs") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::Object(k)) => Some(k),
                Some(x) => return Err(format!("chat_template_kwargs: {x} is not an object")),
            };
            let context = crate::tokenizer::ChatContext { tools: tools.as_ref().map(|t| &t.given), kwargs };
            // The assistant's turn opened, unless the request says not, or continues its final
            // message (vLLM's).
            let turn = crate::tokenizer::Turn::of(|k| o.get(k).filter(|x| !x.is_null()))?;
            let t = tokenizer_for("messages")?;
            t.encode(&t.render_turn(messages, context, turn)?, false)
        }
        (Some(serde_json::Value::String(ids)), _, _) => parse_token_ids(ids, "prompt")?,
        (Some(serde_json::Value::Array(ids)), _, _) => json_ids(ids, "prompt")?,
        _ => return Err("no \"prompt\" (token ids: an array, or a string of them), \"text\" or \"messages\"".into()),
    };
    let stop_text = match o.get("stop_text") {
        None => None,
        Some(x) => {
            let strings = match x {
                serde_json::Value::String(s) => vec![s.clone()],
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|s| s.as_str().map(str::to_string).ok_or_else(|| format!("stop_text: {s} is not a string")))
                    .collect::<Result<Vec<_>, _>>()?,
                x => return Err(format!("stop_text: {x} is not a string or an array of them")),
            };
            if strings.iter().any(String::is_empty) {
                return Err("stop_text: an empty string".into());
            }
            Some(crate::session::TextStops { tokenizer: tokenizer_for("stop_text")?.clone(), strings })
        }
    };
    let stop = match o.get("stop") {
        None => Vec::new(),
        Some(serde_json::Value::String(ids)) => vec![parse_token_ids(ids, "stop")?],
        Some(serde_json::Value::Array(items)) if items.iter().all(|x| x.is_array()) => items
            .iter()
            .map(|x| json_ids(x.as_array().map_or(&[][..], Vec::as_slice), "stop"))
            .collect::<Result<Vec<_>, _>>()?,
        Some(serde_json::Value::Array(ids)) => vec![json_ids(ids, "stop")?],
        Some(x) => return Err(format!("stop: {x} is not token ids (an array of arrays of them, an array, a string)")),
    };
    let flag = |k: &str| match o.get(k) {
        None => Ok(false),
        Some(x) => x.as_bool().ok_or_else(|| format!("{k}: {x} is not true or false")),
    };
    let (logprobs, echo, ignore_eos) = (flag("logprobs")?, flag("echo")?, flag("ignore_eos")?);
    // Sampling numbers are f32: one past its range is named as given, not as the infinity it rounds to.
    let number = |k: &str| {
        let of = |x: &serde_json::Value| match x.as_f64() {
            Some(v) if v.abs() <= f64::from(f32::MAX) => Ok(v),
            Some(_) => Err(format!("{k}: {x} is out of range")),
            None => Err(format!("{k}: {x} is not a number")),
        };
        o.get(k).map(of).transpose()
    };
    let whole =
        |k: &str| o.get(k).map(|x| x.as_u64().ok_or_else(|| format!("{k}: {x} is not a whole number"))).transpose();
    let max_new = whole("max_new_tokens")?.map_or(d.max_new, |n| n as usize);
    let temperature = number("temperature")?.map_or(d.temperature, |t| t as f32);
    let top_p = number("top_p")?.map_or(d.top_p, |p| p as f32);
    check_sampling(temperature, top_p)?;
    let mut shaping = d.shaping.clone();
    if let Some(k) = whole("top_k")? {
        shaping.top_k = k as usize;
    }
    for (k, into) in [
        ("min_p", &mut shaping.min_p),
        ("repetition_penalty", &mut shaping.repetition_penalty),
        ("presence_penalty", &mut shaping.presence_penalty),
        ("frequency_penalty", &mut shaping.frequency_penalty),
    ] {
        if let Some(x) = number(k)? {
            *into = x as f32;
        }
    }
    if let Some(bias) = o.get("logit_bias") {
        shaping.logit_bias = logit_bias(bias)?;
    }
    // vLLM's: token ids that end the request as its end token does, and how many tokens come
    // before either may.
    let stop_ids = match o.get("stop_token_ids") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(ids)) if ids.is_empty() => Vec::new(),
        Some(serde_json::Value::Array(ids)) => json_ids(ids, "stop_token_ids")?,
        Some(x) => return Err(format!("stop_token_ids: {x} is not an array of token ids")),
    };
    if let Some(n) = whole("min_tokens")? {
        if n as usize > max_new {
            return Err(format!("min_tokens: {n} is more than the {max_new} new tokens asked for"));
        }
        shaping.min_tokens = n as usize;
        let eos = d.eos.filter(|_| !ignore_eos);
        shaping.ends = eos.into_iter().chain(stop_ids.iter().copied()).collect();
    }
    shaping.check()?;
    let mut sampler =
        v3c_models::reference::Sampler::new(temperature, top_p, whole("seed")?.unwrap_or(d.seed)).shaped(shaping);
    if let Some(format) = o.get("response_format").filter(|f| !f.is_null()) {
        match format.get("type").and_then(serde_json::Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                let t = tokenizer.ok_or(
                    "response_format: json_object needs a tokenizer (--tokenizer FILE, or tokenizer.json in --weights)",
                )?;
                sampler = sampler.constrained(Box::new(crate::grammar::JsonConstraint::new(t, d.eos)));
            }
            Some("json_schema") if format.get("json_schema").and_then(|j| j.get("schema")).is_some() => {}
            Some("json_schema") => {
                return Err("response_format: json_schema needs {\"json_schema\": {\"schema\": ...}}".into())
            }
            _ => {
                return Err(format!(
                    "response_format: {format} is not {{\"type\": \"text\", \"json_object\" or \"json_schema\"}}"
                ))
            }
        }
    }
    // vLLM's: the completion matches a regular expression, or is one of some strings.
    // A JSON schema (OpenAI's response_format, vLLM's guided_json): its texts' regular expression.
    let schema = match (o.get("response_format").and_then(|f| f.get("json_schema")), o.get("guided_json")) {
        (Some(_), Some(_)) => return Err("response_format and guided_json: one of them".into()),
        (Some(j), None) => {
            let s = j.get("schema").ok_or("response_format: json_schema needs {\"json_schema\": {\"schema\": ...}}")?;
            Some(("response_format", Guide::of_schema(s).map_err(|e| format!("response_format: {e}"))?))
        }
        (None, Some(serde_json::Value::String(text))) => {
            let s: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("guided_json: not a JSON schema: {e}"))?;
            Some(("guided_json", Guide::of_schema(&s).map_err(|e| format!("guided_json: {e}"))?))
        }
        (None, Some(s)) => Some(("guided_json", Guide::of_schema(s).map_err(|e| format!("guided_json: {e}"))?)),
        (None, None) => None,
    };
    let guided = match (o.get("guided_regex"), o.get("guided_choice")) {
        _ if schema.is_some() && (o.contains_key("guided_regex") || o.contains_key("guided_choice")) => {
            return Err("a JSON schema and guided_regex or guided_choice: one of them".into())
        }
        (None, None) => schema,
        (Some(_), Some(_)) => return Err("guided_regex and guided_choice: one of them".into()),
        (Some(serde_json::Value::String(r)), None) => Some(("guided_regex", Guide::Regex(r.clone()))),
        (Some(x), None) => return Err(format!("guided_regex: {x} is not a string")),
        (None, Some(serde_json::Value::Array(c)))
            if !c.is_empty() && c.iter().all(|c| c.as_str().is_some_and(|c| !c.is_empty())) =>
        {
            let choices: Vec<String> = c.iter().filter_map(|c| c.as_str().map(str::to_string)).collect();
            Some(("guided_choice", Guide::Regex(crate::grammar::choice_regex(&choices))))
        }
        (None, Some(x)) => return Err(format!("guided_choice: {x} is not an array of strings")),
    };
    // vLLM's: a context-free grammar (GBNF here) the completion is a sentence of.
    if let Some(g) = o.get("guided_grammar").filter(|g| !g.is_null()) {
        if sampler.constraint.is_some() || guided.is_some() {
            return Err("guided_grammar and another response format or guided decoding: one of them".into());
        }
        let text = g.as_str().ok_or_else(|| format!("guided_grammar: {g} is not a grammar's text"))?;
        let eos = d.eos.filter(|_| !ignore_eos);
        sampler =
            sampler.constrained(grammar_constraint(text, tokenizer, eos).map_err(|e| format!("guided_grammar: {e}"))?);
    }
    if let Some((field, guide)) = guided {
        if sampler.constraint.is_some() {
            return Err(format!("{field} and response_format: one of them"));
        }
        let eos = d.eos.filter(|_| !ignore_eos);
        sampler = sampler.constrained(guide.constraint(tokenizer, eos).map_err(|e| format!("{field}: {e}"))?);
    }
    if let (Some(tools), Some(t)) = (&tools, tokenizer) {
        match (tools.calling(), sampler.constraint.is_some()) {
            (true, true) => return Err("tools and a response format or guided decoding: one of them".into()),
            // The other constraint allows no special tokens, the calls' opening marker among them.
            (false, true) => {}
            (calling, false) => {
                let eos = d.eos.filter(|_| !ignore_eos || !calling);
                let eos = eos.ok_or("tools: needs the end token to end the calls (not ignore_eos)")?;
                sampler = sampler.constrained(tools.constraint(t, eos)?);
            }
        }
    }
    // A chat's reasoning, told from its answer where the server reads it.
    let reasoning = match (d.reasoning, o.contains_key("messages"), tokenizer) {
        (true, true, Some(t)) => Some(crate::reasoning::Reasoning::new(t, &prompt)?),
        _ => None,
    };
    let top_logprobs = whole("top_logprobs")?.unwrap_or(0) as usize;
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(format!("top_logprobs: {top_logprobs} (at most {MAX_TOP_LOGPROBS})"));
    }
    // Alternatives come with the chosen token's log-probability.
    let logprobs = logprobs || top_logprobs > 0;
    let mut stop = stop;
    stop.extend(stop_ids.into_iter().map(|t| vec![t]));
    let request = crate::session::Request {
        stop,
        stop_text,
        echo,
        ignore_eos,
        logprobs,
        top_logprobs,
        tools: tools.map(std::sync::Arc::new),
        reasoning,
        ..crate::session::Request::new(prompt, max_new, sampler)
    };
    Ok((o.get("id").cloned(), request))
}

/// What a completion is held to by a regular expression or a grammar.
enum Guide {
    Regex(String),
    /// GBNF.
    Grammar(String),
}

impl Guide {
    /// A JSON schema's: its regular expression, or where its references recurse, its grammar.
    fn of_schema(schema: &serde_json::Value) -> Result<Guide, String> {
        Ok(match crate::gbnf::schema_grammar(schema)? {
            Some(g) => Guide::Grammar(g),
            None => Guide::Regex(crate::schema::schema_regex(schema)?),
        })
    }

    /// The constraint through `tokenizer`, ended by `eos`.
    fn constraint(
        &self,
        tokenizer: Option<&std::sync::Arc<crate::tokenizer::Tokenizer>>,
        eos: Option<u32>,
    ) -> Result<Box<dyn v3c_models::sampling::Constraint>, String> {
        let regex = match self {
            Guide::Grammar(text) => return grammar_constraint(text, tokenizer, eos),
            Guide::Regex(r) => r,
        };
        let t = tokenizer.ok_or("needs a tokenizer (--tokenizer FILE, or tokenizer.json in --weights)")?;
        let eos = eos.ok_or("needs the end token to end the match (not --ignore-eos)")?;
        let pattern = crate::grammar::Pattern::cached(regex)?;
        Ok(Box::new(crate::grammar::PatternConstraint::new(pattern, t, eos)))
    }
}

/// A completion held to the GBNF grammar `text` through `tokenizer`, ended by `eos`.
fn grammar_constraint(
    text: &str,
    tokenizer: Option<&std::sync::Arc<crate::tokenizer::Tokenizer>>,
    eos: Option<u32>,
) -> Result<Box<dyn v3c_models::sampling::Constraint>, String> {
    let t = tokenizer.ok_or("needs a tokenizer (--tokenizer FILE, or tokenizer.json in --weights)")?;
    let eos = eos.ok_or("needs the end token to end the sentence (not ignore_eos)")?;
    let grammar = crate::gbnf::cached(text)?;
    Ok(Box::new(crate::gbnf::GrammarConstraint::new(grammar, t, eos)))
}

/// A chat request's fields beside its `messages` (OpenAI's and vLLM's), which only a chat takes.
pub const CHAT_FIELDS: [&str; 6] = [
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
];

/// A request's fields beyond temperature and top-p that shape its sampling and its end
/// ([`v3c_models::sampling`]): OpenAI's and vLLM's, named as both name them (the HTTP API passes
/// them on as they are).
pub const SAMPLING_FIELDS: [&str; 14] = [
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "guided_regex",
    "guided_choice",
    "guided_json",
    "guided_grammar",
];

/// OpenAI's `logit_bias`: `{"token id": bias, ...}` (`null`: none).
fn logit_bias(x: &serde_json::Value) -> Result<Vec<(u32, f32)>, String> {
    let o = match x {
        serde_json::Value::Null => return Ok(Vec::new()),
        serde_json::Value::Object(o) => o,
        x => return Err(format!("logit_bias: {x} is not an object of token ids and biases")),
    };
    let mut bias = Vec::with_capacity(o.len());
    for (k, v) in o {
        let t = k.parse::<u32>().map_err(|_| format!("logit_bias: \"{k}\" is not a token id"))?;
        let b = v.as_f64().ok_or_else(|| format!("logit_bias: {v} (token {t}) is not a number"))?;
        bias.push((t, b as f32));
    }
    Ok(bias)
}

/// The most alternatives a request may ask for at each token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Token ids from a JSON array (at least one), for field `what`.
fn json_ids(ids: &[serde_json::Value], what: &str) -> Result<Vec<u32>, String> {
    let id = |x: &serde_json::Value| x.as_u64().and_then(|t| u32::try_from(t).ok());
    let ids = ids
        .iter()
        .map(|x| id(x).ok_or_else(|| format!("{what}: {x} is not a token id")))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err(format!("{what}: no token ids given"));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Greedy, 8 new tokens, seed 3, no end token.
    fn defaults() -> RequestDefaults {
        RequestDefaults {
            max_new: 8,
            temperature: 0.0,
            top_p: 1.0,
            seed: 3,
            shaping: Default::default(),
            eos: None,
            reasoning: false,
            tool_format: Default::default(),
        }
    }

    /// A serve request: plain ids take the defaults, JSON fields replace them; every bad field is
    /// named.
    #[test]
    fn requests_take_the_defaults_they_do_not_give() {
        let d = defaults();
        let (id, r) = parse_request(" 1 2 3 ", &d, None).unwrap();
        assert_eq!((id, r.prompt, r.max_new, r.sampler.temperature), (None, vec![1, 2, 3], 8, 0.0));
        let (id, r) =
            parse_request(r#"{"prompt": [4, 5], "max_new_tokens": 2, "temperature": 0.5, "id": "x"}"#, &d, None)
                .unwrap();
        assert_eq!((id, r.prompt, r.max_new, r.sampler.temperature), (Some("x".into()), vec![4, 5], 2, 0.5));
        assert_eq!((r.stop.len(), r.logprobs), (0, false));
        for (stop, want) in [
            (r#"[[1, 2], [7]]"#, vec![vec![1, 2], vec![7]]),
            (r#"[1, 2]"#, vec![vec![1, 2]]),
            (r#""3 4""#, vec![vec![3, 4]]),
        ] {
            let (_, r) =
                parse_request(&format!(r#"{{"prompt": [4], "stop": {stop}, "logprobs": true}}"#), &d, None).unwrap();
            assert_eq!((r.stop, r.logprobs), (want, true), "{stop}");
        }
        let (_, r) = parse_request(r#"{"prompt": [4], "top_logprobs": 5}"#, &d, None).unwrap();
        assert_eq!((r.logprobs, r.top_logprobs), (true, 5), "alternatives bring the chosen token's");
        let (_, r) = parse_request(r#"{"prompt": [4, 5], "logprobs": true, "echo": true}"#, &d, None).unwrap();
        assert!(r.echo);
        assert!(parse_request(r#"{"prompt": [4], "echo": 1}"#, &d, None)
            .unwrap_err()
            .contains("echo: 1 is not true or false"));
        for (line, err) in [
            (r#"{"prompt": "1 2", "max_tokens": 3}"#, "unknown field 'max_tokens'"),
            (r#"{"prompt": [1, -2]}"#, "prompt: -2 is not a token id"),
            (r#"{"prompt": []}"#, "prompt: no token ids given"),
            (r#"{"max_new_tokens": 3}"#, "no \"prompt\""),
            (r#"{"prompt": "1", "top_p": 0}"#, "top-p 0 must be in (0, 1]"),
            (r#"{"prompt": "1", "top_p": 1e308}"#, "top_p: 1e+308 is out of range"),
            (r#"{"prompt": "1", "temperature": -1e39}"#, "temperature: -1e+39 is out of range"),
            (r#"{"prompt": "1", "presence_penalty": 1e300}"#, "presence_penalty: 1e+300 is out of range"),
            (r#"{"prompt": "1", "seed": 1.5}"#, "seed: 1.5 is not a whole number"),
            ("{\"prompt\": ", "not a JSON request"),
            ("", "prompt: no token ids given"),
            (r#"{"prompt": "1", "stop": [[1], []]}"#, "stop: no token ids given"),
            (r#"{"prompt": "1", "stop": 5}"#, "stop: 5 is not token ids"),
            (r#"{"prompt": "1", "logprobs": 1}"#, "logprobs: 1 is not true or false"),
            (r#"{"prompt": "1", "top_logprobs": 21}"#, "top_logprobs: 21 (at most 20)"),
        ] {
            let got = parse_request(line, &d, None).unwrap_err();
            assert!(got.contains(err), "{line}: {got}");
        }
    }

    /// Top-k, min-p, the penalties and the logit bias: the defaults' (the command line's) unless
    /// the request gives its own, each checked and named.
    #[test]
    fn requests_shape_their_sampling() {
        let shaping = v3c_models::sampling::Shaping { top_k: 40, repetition_penalty: 1.2, ..Default::default() };
        let d = RequestDefaults {
            max_new: 8,
            temperature: 0.7,
            top_p: 1.0,
            seed: 3,
            shaping,
            eos: None,
            reasoning: false,
            tool_format: Default::default(),
        };
        let (_, r) = parse_request("1 2", &d, None).unwrap();
        assert_eq!(*r.sampler.shaping, d.shaping);
        let line = r#"{"prompt": [1], "min_p": 0.05, "presence_penalty": -0.5, "frequency_penalty": 1,
                      "logit_bias": {"5": -100, "17": 2.5}, "top_k": 0}"#;
        let (_, r) = parse_request(line, &d, None).unwrap();
        let mut bias = r.sampler.shaping.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, [(5, -100.0), (17, 2.5)]);
        let s = &r.sampler.shaping;
        assert_eq!((s.top_k, s.min_p, s.repetition_penalty), (0, 0.05, 1.2));
        assert_eq!((s.presence_penalty, s.frequency_penalty), (-0.5, 1.0));
        assert!(!r.sampler.plain_greedy() && !r.sampler.greedy());
        // vLLM's per-request end: the end token ignored, stop token ids, ends held back.
        let d = RequestDefaults { eos: Some(1), ..d };
        let line = r#"{"prompt": [1], "stop_token_ids": [7, 9], "min_tokens": 2, "ignore_eos": false}"#;
        let (_, r) = parse_request(line, &d, None).unwrap();
        assert_eq!((r.stop.clone(), r.ignore_eos), (vec![vec![7], vec![9]], false));
        assert_eq!((r.sampler.shaping.min_tokens, &r.sampler.shaping.ends), (2, &vec![1, 7, 9]));
        let (_, r) = parse_request(r#"{"prompt": [1], "min_tokens": 2, "ignore_eos": true}"#, &d, None).unwrap();
        assert_eq!((r.ignore_eos, &r.sampler.shaping.ends), (true, &vec![]));
        for (line, err) in [
            (r#"{"prompt": [1], "min_tokens": 9}"#, "min_tokens: 9 is more than the 8 new tokens asked for"),
            (r#"{"prompt": [1], "stop_token_ids": 3}"#, "stop_token_ids: 3 is not an array of token ids"),
            (r#"{"prompt": [1], "stop_token_ids": [-3]}"#, "stop_token_ids: -3 is not a token id"),
            (r#"{"prompt": [1], "min_p": 2}"#, "min-p 2 must be in [0, 1]"),
            (r#"{"prompt": [1], "top_k": -1}"#, "top_k: -1 is not a whole number"),
            (r#"{"prompt": [1], "repetition_penalty": 0}"#, "repetition-penalty 0 must be > 0"),
            (r#"{"prompt": [1], "presence_penalty": "a"}"#, "presence_penalty: \"a\" is not a number"),
            (r#"{"prompt": [1], "frequency_penalty": 2.5}"#, "frequency-penalty 2.5 must be in [-2, 2]"),
            (r#"{"prompt": [1], "logit_bias": {"x": 1}}"#, "logit_bias: \"x\" is not a token id"),
            (r#"{"prompt": [1], "logit_bias": {"3": "1"}}"#, "logit_bias: \"1\" (token 3) is not a number"),
            (r#"{"prompt": [1], "logit_bias": {"3": 101}}"#, "logit-bias 101 of token 3 must be in [-100, 100]"),
            (r#"{"prompt": [1], "logit_bias": [3]}"#, "logit_bias: [3] is not an object of token ids and biases"),
        ] {
            assert_eq!(parse_request(line, &d, None).unwrap_err(), err, "{line}");
        }
    }

    /// A chat's tools: described by the chat template, the completion held to the tool choice
    /// (the end token needed where calls are read); misplaced or conflicting fields named.
    #[test]
    fn chats_take_tools() {
        let d = RequestDefaults { eos: Some(1), ..defaults() };
        let t = crate::tokenizer::fixture::shared();
        let messages = serde_json::json!([{"role": "user", "content": "Weather?"}]);
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        for choice in ["none", "auto", "required"] {
            let line = serde_json::json!({"messages": messages, "tools": tools, "tool_choice": choice});
            let (_, r) = parse_request(&line.to_string(), &d, Some(&t)).unwrap();
            let context = crate::tokenizer::ChatContext::tools(Some(&tools));
            assert_eq!(r.prompt, t.chat_with(&messages, context, true).unwrap());
            assert_ne!(r.prompt, t.chat(&messages, true).unwrap(), "the tools described");
            let tools = r.tools.as_ref().unwrap();
            assert_eq!(tools.calling(), choice != "none");
            assert!(r.sampler.constraint.is_some() && !r.sampler.plain_greedy());
            // The fixture's markers (ids 971..) past a model's vocabulary: no calls can be made.
            assert_eq!(r.outside(971).is_some(), choice != "none", "{choice}");
            assert_eq!(r.outside(t.vocab_size()), None);
        }
        let line = serde_json::json!({"messages": messages, "tools": []});
        assert!(parse_request(&line.to_string(), &d, Some(&t)).unwrap().1.tools.is_none());
        // vLLM's chat_template_kwargs and add_generation_prompt reach the template.
        let kwargs = serde_json::json!({"thinking": true});
        let line =
            serde_json::json!({"messages": messages, "chat_template_kwargs": kwargs, "add_generation_prompt": false});
        let (_, r) = parse_request(&line.to_string(), &d, Some(&t)).unwrap();
        let context = crate::tokenizer::ChatContext { tools: None, kwargs: kwargs.as_object() };
        assert_eq!(r.prompt, t.chat_with(&messages, context, false).unwrap());
        assert_ne!(r.prompt, t.chat(&messages, true).unwrap());
        for (line, err) in [
            (
                serde_json::json!({"text": "x", "tools": tools}),
                "tools: only with \"messages\" (a chat) and a tokenizer",
            ),
            (serde_json::json!({"text": "x", "tool_choice": "auto"}), "tool_choice: only with \"messages\""),
            (
                serde_json::json!({"messages": messages, "tools": tools, "response_format": {"type": "json_object"}}),
                "tools and a response format or guided decoding: one of them",
            ),
            (
                serde_json::json!({"messages": messages, "tools": tools, "ignore_eos": true}),
                "tools: needs the end token to end the calls (not ignore_eos)",
            ),
            (serde_json::json!({"messages": messages, "tools": tools, "tool_choice": 3}), "tool_choice: 3 is not"),
            (
                serde_json::json!({"messages": messages, "chat_template_kwargs": 3}),
                "chat_template_kwargs: 3 is not an object",
            ),
            (
                serde_json::json!({"messages": messages, "add_generation_prompt": "yes"}),
                "add_generation_prompt: \"yes\" is not true or false",
            ),
            (
                serde_json::json!({"text": "x", "add_generation_prompt": true}),
                "add_generation_prompt: only with \"messages\"",
            ),
        ] {
            let e = parse_request(&line.to_string(), &d, Some(&t)).unwrap_err();
            assert!(e.starts_with(err), "{line}: {e}");
        }
        let line =
            serde_json::json!({"messages": messages, "tools": tools, "tool_choice": "none", "guided_choice": ["a"]});
        assert!(parse_request(&line.to_string(), &d, Some(&t)).is_ok(), "no calls: any other constraint");
        let line = serde_json::json!({"messages": messages, "tools": tools});
        assert!(parse_request(&line.to_string(), &d, None).unwrap_err().starts_with("tools: only with"));
    }

    /// With a tokenizer, a prompt and stop strings come as text; without one, text is refused.
    #[test]
    fn requests_take_text_with_a_tokenizer() {
        let d = defaults();
        let t = crate::tokenizer::fixture::shared();
        let (_, r) = parse_request(r#"{"text": "Hello world!", "stop_text": ["\n\n", "."]}"#, &d, Some(&t)).unwrap();
        assert_eq!(r.prompt, t.encode("Hello world!", true));
        assert_eq!(r.prompt[0], 0, "the template's BOS");
        assert_eq!(r.stop_text.unwrap().strings, ["\n\n", "."]);
        let (_, r) = parse_request(r#"{"messages": [{"role": "user", "content": "Hi"}]}"#, &d, Some(&t)).unwrap();
        assert_eq!(r.prompt, t.chat(&serde_json::json!([{"role": "user", "content": "Hi"}]), true).unwrap());
        let (_, r) = parse_request(r#"{"text": "x", "stop_text": "END"}"#, &d, Some(&t)).unwrap();
        assert_eq!(r.stop_text.unwrap().strings, ["END"]);
        // A JSON object's grammar on the tokens: the logits change, so greedy picks on the host.
        let json = r#"{"text": "x", "response_format": {"type": "json_object"}}"#;
        let (_, r) = parse_request(json, &d, Some(&t)).unwrap();
        assert!(r.sampler.constraint.is_some() && !r.sampler.plain_greedy());
        let (_, r) = parse_request(r#"{"text": "x", "response_format": {"type": "text"}}"#, &d, Some(&t)).unwrap();
        assert!(r.sampler.constraint.is_none() && r.sampler.plain_greedy());
        // vLLM's guided decoding: a regular expression, or a choice of strings, matched whole.
        let d = RequestDefaults { eos: Some(1), ..d };
        let (_, r) = parse_request(r#"{"text": "x", "guided_choice": ["yes", "no"]}"#, &d, Some(&t)).unwrap();
        assert!(r.sampler.constraint.is_some());
        let (_, r) = parse_request(r#"{"text": "x", "guided_grammar": "root ::= [0-9]+"}"#, &d, Some(&t)).unwrap();
        assert!(r.sampler.constraint.is_some());
        // A schema whose references recurse: held by a grammar.
        let list = r##"{"text": "x", "guided_json": {"type": "object", "properties": {"next": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}}, "required": ["next"]}}"##;
        let (_, r) = parse_request(list, &d, Some(&t)).unwrap();
        assert!(format!("{:?}", r.sampler.constraint).contains("Held<Grammar>"), "{:?}", r.sampler.constraint);
        let (_, r) = parse_request(r#"{"text": "x", "guided_regex": "^[0-9]+$"}"#, &d, Some(&t)).unwrap();
        assert!(r.sampler.constraint.is_some());
        for (line, err) in [
            (r#"{"text": "x", "guided_regex": "("}"#, "guided_regex: regex parse error"),
            (r#"{"text": "x", "guided_choice": []}"#, "guided_choice: [] is not an array of strings"),
            (r#"{"text": "x", "guided_choice": ["a"], "guided_regex": "a"}"#, "guided_regex and guided_choice: one"),
            (r#"{"text": "x", "guided_regex": "a", "ignore_eos": true}"#, "guided_regex: needs the end token"),
            (r#"{"text": "x", "guided_grammar": "root ::= a"}"#, "guided_grammar: rule a is used but not defined"),
            (r#"{"text": "x", "guided_grammar": 3}"#, "guided_grammar: 3 is not a grammar's text"),
            (
                r#"{"text": "x", "guided_grammar": "root ::= \"a\"", "guided_regex": "a"}"#,
                "guided_grammar and another response format or guided decoding: one of them",
            ),
            (
                r#"{"text": "x", "guided_grammar": "root ::= \"a\"", "ignore_eos": true}"#,
                "guided_grammar: needs the end token to end the sentence",
            ),
            (
                r#"{"text": "x", "guided_regex": "a", "response_format": {"type": "json_object"}}"#,
                "guided_regex and response_format: one of them",
            ),
        ] {
            let got = parse_request(line, &d, Some(&t)).unwrap_err();
            assert!(got.starts_with(err), "{line}: {got}");
        }
        assert_eq!(
            parse_request(r#"{"prompt": [1], "guided_choice": ["a"]}"#, &d, None).unwrap_err(),
            "guided_choice: needs a tokenizer (--tokenizer FILE, or tokenizer.json in --weights)"
        );
        assert_eq!(
            parse_request(r#"{"prompt": [1], "response_format": {"type": "json_object"}}"#, &d, None).unwrap_err(),
            "response_format: json_object needs a tokenizer (--tokenizer FILE, or tokenizer.json in --weights)"
        );
        for (line, err) in [
            (r#"{"text": "hi"}"#, "text: text needs a tokenizer (--tokenizer FILE, or tokenizer.json in --weights)"),
            (r#"{"prompt": [1], "stop_text": "x"}"#, "stop_text: text needs a tokenizer"),
        ] {
            assert!(parse_request(line, &d, None).unwrap_err().starts_with(err), "{line}");
        }
        for (line, err) in [
            (r#"{"text": "hi", "prompt": [1]}"#, "\"prompt\" and \"text\": one prompt a request"),
            (r#"{"text": "hi", "messages": []}"#, "\"text\" and \"messages\": one prompt a request"),
            (r#"{"messages": []}"#, "messages: an empty conversation"),
            (
                r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
                "chat template: invalid operation: unknown role: robot (in chat:1)",
            ),
            (r#"{"text": 5}"#, "text: 5 is not a string"),
            (r#"{"text": "x", "stop_text": [""]}"#, "stop_text: an empty string"),
            (r#"{"text": "x", "stop_text": [1]}"#, "stop_text: 1 is not a string"),
            (r#"{"text": "x", "stop_text": {}}"#, "stop_text: {} is not a string or an array of them"),
            (
                r#"{"text": "x", "response_format": {"type": "json_schema"}}"#,
                "response_format: json_schema needs {\"json_schema\": {\"schema\": ...}}",
            ),
            (
                r#"{"text": "x", "response_format": "json"}"#,
                "response_format: \"json\" is not {\"type\": \"text\", \"json_object\" or \"json_schema\"}",
            ),
        ] {
            assert_eq!(parse_request(line, &d, Some(&t)).unwrap_err(), err, "{line}");
        }
        // A JSON schema, OpenAI's way or vLLM's (an object, or its text): a pattern on the tokens.
        let d = RequestDefaults { eos: Some(1), ..d };
        let schema = r#"{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}"#;
        for line in [
            format!(
                r#"{{"text": "x", "response_format": {{"type": "json_schema", "json_schema": {{"name": "n", "schema": {schema}}}}}}}"#
            ),
            format!(r#"{{"text": "x", "guided_json": {schema}}}"#),
            format!(r#"{{"text": "x", "guided_json": {}}}"#, serde_json::Value::from(schema)),
        ] {
            let (_, r) = parse_request(&line, &d, Some(&t)).unwrap();
            assert!(r.sampler.constraint.is_some(), "{line}");
        }
        for (line, err) in [
            (
                r#"{"text": "x", "guided_json": {"type": "string", "format": 5}}"#,
                "guided_json: #/format: 5 is not a format's name",
            ),
            (r#"{"text": "x", "guided_json": "{"}"#, "guided_json: not a JSON schema: EOF while parsing"),
            (
                r#"{"text": "x", "guided_json": {"type": "null"}, "guided_regex": "a"}"#,
                "a JSON schema and guided_regex or guided_choice",
            ),
        ] {
            let got = parse_request(line, &d, Some(&t)).unwrap_err();
            assert!(got.starts_with(err), "{line}: {got}");
        }
    }

    proptest! {
        #[test]
        fn token_ids_round_trip_through_any_whitespace(ids in prop::collection::vec(any::<u32>(), 1..50),
                                                     seps in prop::collection::vec("[ \t\n]{1,3}", 50)) {
            let text: String = ids.iter().zip(&seps).map(|(id, sep)| format!("{sep}{id}")).collect();
            prop_assert_eq!(parse_token_ids(&text, "--tokens").unwrap(), ids);
        }

        #[test]
        fn a_bad_word_is_named(prefix in prop::collection::vec(0u32..1000, 0..5), bad in "[a-z-][a-z0-9.]{0,6}") {
            let mut words: Vec<String> = prefix.iter().map(u32::to_string).collect();
            words.push(bad.clone());
            let err = parse_token_ids(&words.join(" "), "--tokens").unwrap_err();
            prop_assert!(err.starts_with(&format!("--tokens: '{bad}' is not a token id")), "{}", err);
        }
    }

    #[test]
    fn empty_and_out_of_range_are_rejected() {
        assert_eq!(parse_token_ids("  ", "--tokens").unwrap_err(), "--tokens: no token ids given");
        assert!(parse_token_ids("1 4294967296", "--tokens").unwrap_err().contains("'4294967296'"));
    }
}

/// The options of a training run that `v3c train` and `v3r train` share ([`crate::training`]).
#[derive(clap::Args, Debug)]
pub struct TrainRunArgs {
    /// Training data: token ids, whitespace-separated text or little-endian u32 binary (with
    /// --tokenizer: text).
    #[arg(long, value_name = "FILE")]
    pub data: std::path::PathBuf,
    /// Read --data and --eval-data as text with this tokenizer.json (or a checkpoint directory
    /// holding one): a .jsonl file a document a line ({"text": ...}), any other file one document;
    /// each encoded with the tokenizer's template (its BOS first), the documents one after another.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Optimizer steps to take.
    #[arg(long, value_name = "N")]
    pub steps: usize,
    /// Directory for the trained checkpoint (HF layout), optimizer state, loss log and expert loads;
    /// created (must not exist) unless --resume.
    #[arg(long, value_name = "DIR")]
    pub out: std::path::PathBuf,
    /// Sequences per step (gradients accumulated over them).
    #[arg(long, value_name = "B", default_value_t = 4)]
    pub batch: usize,
    /// Peak learning rate (linear warm-up over the first 10% of steps, then cosine to 10%).
    #[arg(long, value_name = "LR", default_value_t = 3e-3)]
    pub lr: f32,
    /// Seed of the sampling of windows from the data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue the run in --out (its checkpoint, optimizer state and step count; the log grows).
    /// A run stopped by Ctrl-C saves after the step under way, ready for this.
    #[arg(long)]
    pub resume: bool,
    /// Also write the checkpoint and optimizer state every N steps (each file replaced whole), so
    /// that a run stopped early can --resume from its last save; 0: at the end only.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub save_every: usize,
    /// AdamW's decoupled weight decay (on matrices; norms, biases and other vectors none).
    #[arg(long, value_name = "WD", default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Clip each step's gradient to this global L2 norm.
    #[arg(long, value_name = "NORM", default_value_t = 1.0)]
    pub clip_norm: f32,
    /// Steps of the learning rate's linear warm-up (default: a tenth of the run's steps).
    #[arg(long, value_name = "N")]
    pub warmup_steps: Option<usize>,
    /// Held-out token ids (the formats of --data): the loss on --eval-windows windows of it, with
    /// the parameters as they are (nothing updated), before the first step, every --eval-every
    /// steps and after the last, written to eval.csv in --out and shown beside the training loss.
    #[arg(long, value_name = "FILE")]
    pub eval_data: Option<std::path::PathBuf>,
    /// Steps between evaluations (0: before the first step and after the last only).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "eval_data")]
    pub eval_every: usize,
    /// Windows of --eval-data each evaluation runs, evenly spaced over the file (the same each time).
    #[arg(long, value_name = "K", default_value_t = 8, requires = "eval_data")]
    pub eval_windows: usize,
}

impl TrainRunArgs {
    /// The optimizer's settings these flags give.
    pub fn optimizer(&self) -> crate::training::OptimizerOptions {
        crate::training::OptimizerOptions {
            weight_decay: self.weight_decay,
            clip_norm: self.clip_norm,
            warmup_steps: self.warmup_steps,
        }
    }

    /// The evaluation these flags ask for (None: no --eval-data).
    pub fn eval(&self) -> Option<crate::training::EvalOptions<'_>> {
        let data = self.eval_data.as_deref()?;
        Some(crate::training::EvalOptions { data, every: self.eval_every, windows: self.eval_windows })
    }
}
