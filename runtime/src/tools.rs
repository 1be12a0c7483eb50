//! OpenAI's tool calling (`tools`, `tool_choice`, `parallel_tool_calls`) in DeepSeek-V3's format.
//!
//! The functions go to the chat template as `tools` (it describes them to the model); the model
//! calls them after its content as
//!
//! ```text
//! <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
//! ```json
//! ARGUMENTS
//! ```<｜tool▁call▁end｜>
//! <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>
//! ```
//!
//! or, DeepSeek-V3.1's ([`ToolFormat::DeepSeekV31`]: the same architecture, another template),
//! `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>` between the same outer markers.
//!
//! [`split_calls`] reads them back out of a completion. While it writes them, a
//! [`ToolConstraint`] holds it to that shape, a GBNF grammar ([`crate::gbnf`]): names of the
//! given functions only, each one's arguments an instance of its `parameters` schema
//! ([`crate::gbnf::schema_rules`]; recursive ones too; a schema with keywords not taken, any
//! JSON object, said in the server's log). `tool_choice` decides when:
//! `auto` once the model opens the calls itself, `required` and a named function from the first
//! token, `none` never (the opening marker is masked).

use std::sync::Arc;

use serde_json::Value;
use v3c_models::sampling::Constraint;

use crate::gbnf::GrammarConstraint;
use crate::tokenizer::Tokenizer;

pub const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub const CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub const CALL_END: &str = "<｜tool▁call▁end｜>";
pub const SEP: &str = "<｜tool▁sep｜>";

/// How a model writes its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolFormat {
    /// `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` + a fenced JSON block + `<｜tool▁call▁end｜>`.
    #[default]
    DeepSeekV3,
    /// `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>`.
    DeepSeekV31,
}

impl ToolFormat {
    /// One call's parts, in order: its fixed text (as `lit` writes it), `name` and `arguments`
    /// (text, or a grammar's expressions, as the caller writes them).
    fn call(self, lit: impl Fn(&str) -> String, name: &str, arguments: &str) -> Vec<String> {
        let (name, arguments) = (name.to_string(), arguments.to_string());
        match self {
            ToolFormat::DeepSeekV3 => vec![
                lit(&format!("{CALL_BEGIN}function{SEP}")),
                name,
                lit("\n```json\n"),
                arguments,
                lit(&format!("\n```{CALL_END}")),
            ],
            ToolFormat::DeepSeekV31 => vec![lit(CALL_BEGIN), name, lit(SEP), arguments, lit(CALL_END)],
        }
    }

    /// One call's name and arguments out of its text between its begin and end markers.
    fn read(self, call: &str) -> Option<ToolCall> {
        let (name, arguments) = match self {
            ToolFormat::DeepSeekV3 => {
                let (_kind, rest) = call.split_once(SEP)?;
                let (name, arguments) = rest.split_once('\n').unwrap_or((rest, ""));
                let arguments = arguments.trim();
                let arguments =
                    arguments.strip_prefix("```json").or_else(|| arguments.strip_prefix("```")).unwrap_or(arguments);
                (name, arguments.strip_suffix("```").unwrap_or(arguments))
            }
            ToolFormat::DeepSeekV31 => call.split_once(SEP)?,
        };
        Some(ToolCall { name: name.trim().to_string(), arguments: arguments.trim().to_string() })
    }
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model writes content only.
    None,
    /// The model decides (the default).
    Auto,
    /// At least one call, from the first token.
    Required,
    /// One call of this function, from the first token.
    Function(String),
}

/// A request's tools.
#[derive(Debug, Clone)]
pub struct Tools {
    /// As the request gave them: what the chat template is given.
    pub given: Value,
    /// Each function's name and the GBNF rules of its arguments (rule `args-K`, K its place).
    functions: Vec<(String, String)>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls`: more than one call at a time.
    pub parallel: bool,
    /// Functions whose arguments are held to any JSON object only, and why.
    pub loose: Vec<(String, String)>,
    /// The token that opens the calls.
    pub trigger: u32,
    /// The markers that are special tokens (walked as their text while calls are written).
    specials: Vec<u32>,
    /// How the model writes its calls.
    pub format: ToolFormat,
}

impl Tools {
    /// A request's `tools`, `tool_choice` and `parallel_tool_calls`, for `tokenizer`'s model; None
    /// when `tools` is left out, null or empty.
    pub fn parse(
        tools: Option<&Value>,
        choice: Option<&Value>,
        parallel: Option<&Value>,
        tokenizer: &Tokenizer,
    ) -> Result<Option<Tools>, String> {
        let list = match tools {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(list)) => list.as_slice(),
            Some(x) => return Err(format!("tools: {x} is not a list of tools")),
        };
        if list.is_empty() {
            return match choice.filter(|c| !c.is_null()) {
                None => Ok(None),
                Some(_) => Err("tool_choice: only with \"tools\"".into()),
            };
        }
        let mut functions: Vec<(String, String)> = Vec::with_capacity(list.len());
        let mut loose = Vec::new();
        for (i, tool) in list.iter().enumerate() {
            let at = format!("tools[{i}]");
            let o = tool.as_object().ok_or_else(|| format!("{at}: {tool} is not a tool"))?;
            if let Some(k) = o.keys().find(|k| !["type", "function"].contains(&k.as_str())) {
                return Err(format!("{at}: unknown field '{k}' (type, function)"));
            }
            if o.get("type").and_then(Value::as_str) != Some("function") {
                return Err(format!("{at}.type: only \"function\" tools are served"));
            }
            let f = o.get("function").and_then(Value::as_object).ok_or_else(|| format!("{at}: no \"function\""))?;
            let at = format!("{at}.function");
            const FIELDS: [&str; 4] = ["name", "description", "parameters", "strict"];
            if let Some(k) = f.keys().find(|k| !FIELDS.contains(&k.as_str())) {
                return Err(format!("{at}: unknown field '{k}' ({})", FIELDS.join(", ")));
            }
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| format!("{at}: no \"name\" string"))?;
            let fits = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.';
            if name.is_empty() || name.len() > 64 || !name.chars().all(fits) {
                return Err(format!("{at}.name: {name:?} is not 1 to 64 letters, digits, '_', '-' or '.'"));
            }
            if functions.iter().any(|(n, _)| n == name) {
                return Err(format!("{at}.name: {name} is given twice"));
            }
            let empty = serde_json::json!({"type": "object", "properties": {}});
            let parameters = f.get("parameters").filter(|p| !p.is_null()).unwrap_or(&empty);
            let is_object = parameters.get("type").and_then(Value::as_str) == Some("object")
                || (parameters.get("type").is_none() && parameters.get("properties").is_some());
            if !is_object {
                return Err(format!("{at}.parameters: {parameters} is not an object's schema"));
            }
            let rule = format!("args-{i}");
            let arguments = match crate::gbnf::schema_rules(parameters, &rule) {
                Ok((rules, _)) => rules,
                Err(e) => {
                    loose.push((name.to_string(), e));
                    crate::gbnf::any_object_rules(&rule)
                }
            };
            functions.push((name.to_string(), arguments));
        }
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) if s == "none" => ToolChoice::None,
            Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
            Some(Value::String(s)) if s == "required" => ToolChoice::Required,
            Some(c @ Value::Object(_)) => {
                let name = match (c.get("type").and_then(Value::as_str), c.get("function").and_then(|f| f.get("name")))
                {
                    (Some("function"), Some(Value::String(n))) => n,
                    _ => {
                        return Err(format!(
                            "tool_choice: {c} is not {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                        ))
                    }
                };
                if !functions.iter().any(|(n, _)| n == name) {
                    return Err(format!("tool_choice: {name} is not among the tools"));
                }
                ToolChoice::Function(name.clone())
            }
            Some(x) => return Err(format!("tool_choice: {x} is not \"none\", \"auto\", \"required\" or a function")),
        };
        let parallel = match parallel {
            None | Some(Value::Null) => true,
            Some(x) => x.as_bool().ok_or_else(|| format!("parallel_tool_calls: {x} is not true or false"))?,
        };
        let mut ids = Vec::new();
        for marker in [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP] {
            let id = tokenizer.token_id(marker).ok_or_else(|| {
                format!("tools: the tokenizer has no {marker} token (DeepSeek-V3's tool-call markers)")
            })?;
            ids.push(id);
        }
        let specials = ids.iter().copied().filter(|&id| tokenizer.is_special(id)).collect();
        let given = Value::Array(list.to_vec());
        let format = ToolFormat::default();
        Ok(Some(Tools { given, functions, choice, parallel, loose, trigger: ids[0], specials, format }))
    }

    /// The same tools, their calls written in `format`.
    pub fn written_as(self, format: ToolFormat) -> Tools {
        Tools { format, ..self }
    }

    /// Whether the completion is read for calls (and held to their shape once they begin).
    pub fn calling(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The GBNF grammar of what follows the opening marker: calls of the chosen functions (one
    /// with a named function or without parallel calls; else one or more, a line apart), then
    /// the closing marker.
    pub fn calls_grammar(&self) -> String {
        use crate::gbnf::quote;
        let chosen: Vec<(usize, &(String, String))> = (self.functions.iter().enumerate())
            .filter(|(_, (name, _))| match &self.choice {
                ToolChoice::Function(f) => f == name,
                _ => true,
            })
            .collect();
        let single = !self.parallel || matches!(self.choice, ToolChoice::Function(_));
        let mut g = match single {
            true => format!("root ::= call {}\n", quote(CALLS_END)),
            false => format!("root ::= call ( {} call )* {}\n", quote("\n"), quote(CALLS_END)),
        };
        let calls: Vec<String> = chosen.iter().map(|(i, _)| format!("call-{i}")).collect();
        g.push_str(&format!("call ::= {}\n", calls.join(" | ")));
        for (i, (name, arguments)) in chosen {
            let parts = self.format.call(quote, &quote(name), &format!("args-{i}"));
            g.push_str(&format!("call-{i} ::= {}\n{arguments}", parts.join(" ")));
        }
        g
    }

    /// What holds a completion to `tool_choice` (`eos`: the end token, allowed once the calls
    /// are closed).
    pub fn constraint(&self, tokenizer: &Arc<Tokenizer>, eos: u32) -> Result<Box<dyn Constraint>, String> {
        let mode = match self.choice {
            ToolChoice::None => Mode::Forbid,
            ToolChoice::Auto => Mode::Lazy,
            ToolChoice::Required | ToolChoice::Function(_) => Mode::Forced,
        };
        let calls = match mode {
            Mode::Forbid => None,
            _ => {
                let grammar = crate::gbnf::cached(&self.calls_grammar()).map_err(|e| format!("tools: {e}"))?;
                let trie = tokenizer.trie_with(&self.specials);
                Some(GrammarConstraint::walking(grammar, trie, tokenizer, Some(eos)))
            }
        };
        Ok(Box::new(ToolConstraint { trigger: self.trigger, mode, on: false, calls }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The opening marker masked.
    Forbid,
    /// Free until the model writes the opening marker, then held to the calls.
    Lazy,
    /// The opening marker first, then the calls.
    Forced,
}

/// A completion held to its `tool_choice` ([`Tools::constraint`]).
#[derive(Debug, Clone)]
pub struct ToolConstraint {
    trigger: u32,
    mode: Mode,
    /// The calls have begun.
    on: bool,
    calls: Option<GrammarConstraint>,
}

impl Constraint for ToolConstraint {
    fn mask(&self, logits: &mut [f32]) {
        match (self.on, self.mode, &self.calls) {
            (true, _, Some(calls)) => calls.mask(logits),
            (false, Mode::Forbid, _) => {
                if let Some(l) = logits.get_mut(self.trigger as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            (false, Mode::Forced, _) => {
                for (i, l) in logits.iter_mut().enumerate() {
                    if i != self.trigger as usize {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            _ => {}
        }
    }

    fn advance(&mut self, token: u32) {
        match (self.on, &mut self.calls) {
            (true, Some(calls)) => calls.advance(token),
            (false, Some(_)) => self.on = token == self.trigger,
            _ => {}
        }
    }

    fn restart(&mut self) {
        self.on = false;
        if let Some(calls) = &mut self.calls {
            calls.restart();
        }
    }

    fn boxed_clone(&self) -> Box<dyn Constraint> {
        Box::new(self.clone())
    }
}

/// A function call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// Its arguments as the model wrote them (JSON, by the constraint).
    pub arguments: String,
}

/// A completion's content and the calls after it (written in `format`); None when it has no
/// well-formed calls (no opening marker, or calls cut short): then it is all content.
pub fn split_calls(tokenizer: &Tokenizer, tokens: &[u32], format: ToolFormat) -> Option<(String, Vec<ToolCall>)> {
    // Every token's bytes, special ones' too (the markers may be special tokens).
    let mut bytes = Vec::new();
    let mut starts = Vec::with_capacity(tokens.len());
    for &t in tokens {
        starts.push(bytes.len());
        bytes.extend(tokenizer.token_bytes_of(t));
    }
    let at = bytes.windows(CALLS_BEGIN.len()).position(|w| w == CALLS_BEGIN.as_bytes())?;
    // The content: the tokens before the marker (special ones left out), and any text of the
    // token the marker begins inside.
    let k = starts.partition_point(|&s| s <= at) - 1;
    let mut content = tokenizer.decode(&tokens[..k], true);
    content.push_str(&String::from_utf8_lossy(&bytes[starts[k]..at]));
    let text = String::from_utf8_lossy(&bytes[at + CALLS_BEGIN.len()..]).into_owned();
    let mut rest = text.as_str();
    let mut calls = Vec::new();
    loop {
        rest = rest.trim_start();
        // Closed, or (the closing marker left out) the calls over.
        if rest.starts_with(CALLS_END) || (!calls.is_empty() && !rest.starts_with(CALL_BEGIN)) {
            break;
        }
        let (call, after) = rest.strip_prefix(CALL_BEGIN)?.split_once(CALL_END)?;
        calls.push(format.read(call)?);
        rest = after;
    }
    Some((content, calls))
}

/// What following a completion's calls as they are written tells, call by call (`index` from 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEvent {
    /// A call of the function `name` began.
    Start { index: usize, name: String },
    /// More of its arguments' text.
    Arguments { index: usize, text: String },
    /// It is whole.
    End { index: usize },
}

impl CallEvent {
    /// The call it tells of.
    pub fn index(&self) -> usize {
        match self {
            CallEvent::Start { index, .. } | CallEvent::Arguments { index, .. } | CallEvent::End { index } => *index,
        }
    }
}

/// Where a [`CallStream`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallPhase {
    /// Before the opening marker.
    Opening,
    /// Between calls, at `text[at..]`.
    Between { at: usize },
    /// In a call's text (after its begin marker, at `start`), before its name is known.
    Header { start: usize },
    /// In its arguments: their text from `start` (the fence and space included), the arguments'
    /// own from `from` (None: before the fence and the space are known), `sent` bytes of them said.
    /// `seen`: where the end marker was last looked for (none begins before it).
    Arguments { start: usize, from: Option<usize>, sent: usize, seen: usize },
    /// The calls are over (closed, or not well formed: no more is said).
    Over,
}

/// A completion's calls followed a token at a time from the token that opens them: each call's
/// start (its name), its arguments' text as it settles — held back only where it may yet be the
/// closing fence or trailing space — and its end. What it says adds up to what [`split_calls`]
/// reads from the whole completion, for each call it reads; calls cut short end without an
/// [`CallEvent::End`]. Each token's work is about its own bytes' (long arguments are not read
/// again for the end marker).
pub struct CallStream {
    format: ToolFormat,
    /// The calls' text so far, and the bytes of a character not yet whole.
    text: String,
    partial: Vec<u8>,
    phase: CallPhase,
    index: usize,
}

impl CallStream {
    pub fn new(format: ToolFormat) -> CallStream {
        CallStream { format, text: String::new(), partial: Vec::new(), phase: CallPhase::Opening, index: 0 }
    }

    /// Token `t` (its bytes, markers' too): what it tells.
    pub fn push(&mut self, tokenizer: &Tokenizer, t: u32) -> Vec<CallEvent> {
        self.partial.extend(tokenizer.token_bytes_of(t));
        loop {
            match std::str::from_utf8(&self.partial) {
                Ok(whole) => {
                    self.text.push_str(whole);
                    self.partial.clear();
                    break;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    self.text.push_str(std::str::from_utf8(&self.partial[..good]).unwrap_or_default());
                    match e.error_len() {
                        // The rest may yet be a character.
                        None => {
                            self.partial.drain(..good);
                            break;
                        }
                        Some(bad) => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            self.partial.drain(..good + bad);
                        }
                    }
                }
            }
        }
        let mut events = Vec::new();
        while self.step(&mut events) {}
        events
    }

    /// One step on from the phase: whether it moved.
    fn step(&mut self, events: &mut Vec<CallEvent>) -> bool {
        let text = self.text.as_str();
        match self.phase {
            CallPhase::Opening => match text.find(CALLS_BEGIN) {
                Some(at) => self.phase = CallPhase::Between { at: at + CALLS_BEGIN.len() },
                None => return false,
            },
            CallPhase::Between { at } => {
                let rest = text[at..].trim_start();
                if rest.starts_with(CALL_BEGIN) {
                    self.phase = CallPhase::Header { start: text.len() - rest.len() + CALL_BEGIN.len() };
                } else if rest.is_empty() || CALL_BEGIN.starts_with(rest) {
                    return false;
                } else {
                    self.phase = CallPhase::Over;
                }
            }
            CallPhase::Header { start } => {
                let call = &text[start..];
                let end = call.find(CALL_END);
                let header = &call[..end.unwrap_or(call.len())];
                let Some(sep) = header.find(SEP) else {
                    if end.is_some() {
                        // A call without a separator: not well formed.
                        self.phase = CallPhase::Over;
                        return true;
                    }
                    return false;
                };
                let (name, from) = match self.format {
                    ToolFormat::DeepSeekV3 => {
                        let after = &header[sep + SEP.len()..];
                        match (after.find('\n'), end) {
                            (Some(n), _) => (&after[..n], Some(start + sep + SEP.len() + n + 1)),
                            // No arguments: the name runs to the end marker.
                            (None, Some(_)) => (after, None),
                            (None, None) => return false,
                        }
                    }
                    ToolFormat::DeepSeekV31 => (&header[..sep], Some(start + sep + SEP.len())),
                };
                events.push(CallEvent::Start { index: self.index, name: name.trim().to_string() });
                // The arguments' text (none: from the end marker) from here.
                let args = from.unwrap_or(start + end.unwrap_or(0));
                self.phase = CallPhase::Arguments { start: args, from: None, sent: 0, seen: args };
            }
            CallPhase::Arguments { start, from, sent, seen } => {
                let raw = &text[start..];
                // Looked for from where it was last looked for: long arguments are not read again.
                let found = text[seen..].find(CALL_END).map(|at| seen + at - start);
                let mut seen = text.len().saturating_sub(CALL_END.len()).max(seen);
                while !text.is_char_boundary(seen) {
                    seen -= 1;
                }
                if let Some(end) = found {
                    // Whole: the arguments as the whole completion's reading takes them.
                    let arguments = self.format.arguments(&raw[..end]);
                    if arguments.len() > sent {
                        let rest = arguments.get(sent..).unwrap_or_default().to_string();
                        events.push(CallEvent::Arguments { index: self.index, text: rest });
                    }
                    events.push(CallEvent::End { index: self.index });
                    self.index += 1;
                    self.phase = CallPhase::Between { at: start + end + CALL_END.len() };
                    return true;
                }
                let from = match from {
                    Some(f) => f,
                    None => match self.format.arguments_start(raw) {
                        Some(f) => {
                            self.phase = CallPhase::Arguments { start, from: Some(start + f), sent, seen };
                            return true;
                        }
                        None => {
                            self.phase = CallPhase::Arguments { start, from: None, sent, seen };
                            return false;
                        }
                    },
                };
                // Said: all but a tail that may yet be the end marker (spelled out a character
                // at a time), and before it one of space and backticks (trimmed, or the fence).
                let args = &text[from..];
                let marker = (1..CALL_END.len().min(args.len() + 1))
                    .rev()
                    .find(|&n| args.is_char_boundary(args.len() - n) && CALL_END.starts_with(&args[args.len() - n..]));
                let args = &args[..args.len() - marker.unwrap_or(0)];
                let settled = args.trim_end_matches(|c: char| c.is_whitespace() || c == '`');
                let sent = match settled.len() > sent {
                    true => {
                        events.push(CallEvent::Arguments { index: self.index, text: settled[sent..].to_string() });
                        settled.len()
                    }
                    false => sent,
                };
                self.phase = CallPhase::Arguments { start, from: Some(from), sent, seen };
                return false;
            }
            CallPhase::Over => return false,
        }
        true
    }
}

impl ToolFormat {
    /// A call's arguments from their text between the name and the call's end marker, as
    /// [`ToolFormat::read`] takes them.
    fn arguments(self, raw: &str) -> String {
        let arguments = raw.trim();
        let arguments = match self {
            ToolFormat::DeepSeekV3 => {
                let a =
                    arguments.strip_prefix("```json").or_else(|| arguments.strip_prefix("```")).unwrap_or(arguments);
                a.strip_suffix("```").unwrap_or(a)
            }
            ToolFormat::DeepSeekV31 => arguments,
        };
        arguments.trim().to_string()
    }

    /// Where the arguments begin in `raw` (their text so far), once that is known: past the
    /// leading space and (DeepSeek-V3's) the opening fence and the space after it.
    fn arguments_start(self, raw: &str) -> Option<usize> {
        let lead = raw.len() - raw.trim_start().len();
        let rest = &raw[lead..];
        let fence = match self {
            ToolFormat::DeepSeekV31 => 0,
            // Not yet known whether it is the fence (or ```json).
            ToolFormat::DeepSeekV3 if rest.len() < "```json".len() && "```json".starts_with(rest) => return None,
            ToolFormat::DeepSeekV3 if rest.starts_with("```json") => "```json".len(),
            ToolFormat::DeepSeekV3 if rest.starts_with("```") => 3,
            ToolFormat::DeepSeekV3 => 0,
        };
        let after = &rest[fence..];
        let space = after.len() - after.trim_start().len();
        // The arguments' first character not yet come: the space may run on.
        (space < after.len()).then_some(lead + fence + space)
    }
}

/// OpenAI's `tool_calls` of a message: each call's `id` (`call_{number}_{k}`), type and function.
pub fn calls_json(number: usize, calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            serde_json::json!({
                "id": format!("call_{number}_{k}"),
                "type": "function",
                "function": { "name": c.name, "arguments": c.arguments },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Arc<Tokenizer> {
        crate::tokenizer::fixture::shared()
    }

    fn weather() -> Value {
        serde_json::json!([
            {"type": "function", "function": {"name": "get_weather", "description": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "now"}},
        ])
    }

    fn call(name: &str, arguments: &str) -> String {
        format!("{CALL_BEGIN}function{SEP}{name}\n```json\n{arguments}\n```{CALL_END}")
    }

    /// The calls' pattern takes calls of the given functions with arguments their schemas
    /// allow, closed; nothing else.
    #[test]
    fn the_calls_pattern_takes_given_functions_with_their_arguments() {
        let t = fixture();
        let tools = Tools::parse(Some(&weather()), None, None, &t).unwrap().unwrap();
        assert_eq!(tools.choice, ToolChoice::Auto);
        let p = crate::gbnf::Grammar::parse(&tools.calls_grammar()).unwrap();
        let w = call("get_weather", r#"{"city": "Paris"}"#);
        let both = format!("{w}\n{}{CALLS_END}", call("now", "{}"));
        for good in [
            format!("{w}{CALLS_END}"),
            both.clone(),
            format!("{}{CALLS_END}", call("get_weather", r#"{"city":"Oslo","unit":"f"}"#)),
        ] {
            assert!(p.matches(good.as_bytes()), "{good}");
        }
        for bad in [
            format!("{}{CALLS_END}", call("get_time", "{}")),
            format!("{}{CALLS_END}", call("get_weather", "{}")),
            format!("{}{CALLS_END}", call("get_weather", r#"{"city": "Paris", "x": 1}"#)),
            format!("{}{CALLS_END}", call("get_weather", r#"{"city": "a very long city name"}"#)),
            w.clone(),
            format!("{w}{w}{CALLS_END}"),
        ] {
            assert!(!p.matches(bad.as_bytes()), "{bad}");
        }
        // One call only: without parallel calls, or with a named function (that one).
        let single = Tools::parse(Some(&weather()), None, Some(&false.into()), &t).unwrap().unwrap();
        let p = crate::gbnf::Grammar::parse(&single.calls_grammar()).unwrap();
        assert!(p.matches(format!("{w}{CALLS_END}").as_bytes()));
        assert!(!p.matches(both.as_bytes()));
        let named = serde_json::json!({"type": "function", "function": {"name": "now"}});
        let now = Tools::parse(Some(&weather()), Some(&named), None, &t).unwrap().unwrap();
        assert_eq!(now.choice, ToolChoice::Function("now".into()));
        let p = crate::gbnf::Grammar::parse(&now.calls_grammar()).unwrap();
        assert!(p.matches(format!("{}{CALLS_END}", call("now", "{ }")).as_bytes()));
        assert!(!p.matches(format!("{w}{CALLS_END}").as_bytes()));
        // DeepSeek-V3.1's calls: no type, no fence.
        let v31 = Tools { format: ToolFormat::DeepSeekV31, ..tools };
        let p = crate::gbnf::Grammar::parse(&v31.calls_grammar()).unwrap();
        let call = format!("{CALL_BEGIN}get_weather{SEP}{{\"city\":\"Paris\"}}{CALL_END}");
        assert!(p.matches(format!("{call}\n{call}{CALLS_END}").as_bytes()));
        assert!(!p.matches(format!("{w}{CALLS_END}").as_bytes()));
    }

    /// A schema the compiler does not take holds that function's arguments to any JSON object
    /// (nested to any depth), and says why.
    #[test]
    fn schemas_not_taken_hold_arguments_to_json_objects() {
        let t = fixture();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "parameters":
            {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}}}]);
        let tools = Tools::parse(Some(&tools), None, None, &t).unwrap().unwrap();
        assert_eq!(
            tools.loose,
            vec![(
                "f".to_string(),
                "#/properties/n/multipleOf: 2: only a power of ten of at most 1 (1, 0.1, 0.01, ...)".to_string()
            )]
        );
        let p = crate::gbnf::Grammar::parse(&tools.calls_grammar()).unwrap();
        for (arguments, ok) in [
            (r#"{"n": 0}"#, true),
            (r#"{"anything": [1, {"x": null}], "s": "\"q\""}"#, true),
            ("{}", true),
            (r#"{"a": {"b": {"c": 1}}}"#, true),
            (r#"{"a": {"b": {"c": {"d": [1, {"e": []}]}}}}"#, true),
            (r#"{"a": [[[1]]]}"#, true),
            (r#"{"a": [[[1]]}"#, false),
            (r#"{"a": }"#, false),
            ("[1]", false),
        ] {
            let text = format!("{}{CALLS_END}", call("f", arguments));
            assert_eq!(p.matches(text.as_bytes()), ok, "{arguments}");
        }
    }

    /// A function whose parameters refer to themselves (a tree) is held to its schema exactly.
    #[test]
    fn recursive_parameters_are_held_exactly() {
        let t = fixture();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "plant", "parameters":
            {"type": "object", "properties": {"leaf": {"type": "boolean"},
                "kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["leaf", "kids"]}}}]);
        let tools = Tools::parse(Some(&tools), None, None, &t).unwrap().unwrap();
        assert!(tools.loose.is_empty(), "{:?}", tools.loose);
        let g = crate::gbnf::Grammar::parse(&tools.calls_grammar()).unwrap();
        let tree = r#"{"leaf": false, "kids": [{"leaf": true, "kids": []}, {"leaf": false, "kids": [{"leaf": true, "kids": []}]}]}"#;
        assert!(g.matches(format!("{}{CALLS_END}", call("plant", tree)).as_bytes()));
        let wrong = tree.replace(r#""leaf": true, "kids": []}]"#, r#""leaf": 1, "kids": []}]"#);
        assert!(!g.matches(format!("{}{CALLS_END}", call("plant", &wrong)).as_bytes()), "{wrong}");
    }

    #[test]
    fn bad_tools_are_refused_by_name() {
        let t = fixture();
        let parse = |tools: Value, choice: Option<Value>| {
            Tools::parse(Some(&tools), choice.as_ref(), None, &t).map(|x| x.map(|x| x.choice))
        };
        let f = |name: &str| serde_json::json!({"type": "function", "function": {"name": name}});
        for (tools, choice, error) in [
            (serde_json::json!({}), None, "tools: {} is not a list of tools"),
            (serde_json::json!([{"type": "code"}]), None, "tools[0].type: only \"function\" tools are served"),
            (serde_json::json!([f("a b")]), None, "tools[0].function.name: \"a b\" is not 1 to 64 letters"),
            (serde_json::json!([f("a"), f("a")]), None, "tools[1].function.name: a is given twice"),
            (
                serde_json::json!([{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}]),
                None,
                "tools[0].function.parameters: {\"type\":\"string\"} is not an object's schema",
            ),
            (
                serde_json::json!([{"type": "function", "function": {"name": "a", "arity": 2}}]),
                None,
                "tools[0].function: unknown field 'arity'",
            ),
            (serde_json::json!([f("a")]), Some(serde_json::json!("sometimes")), "tool_choice: \"sometimes\" is not"),
            (
                serde_json::json!([f("a")]),
                Some(serde_json::json!({"type": "function", "function": {"name": "b"}})),
                "tool_choice: b is not among the tools",
            ),
            (serde_json::json!([]), Some(serde_json::json!("auto")), "tool_choice: only with \"tools\""),
        ] {
            let e = parse(tools, choice).unwrap_err();
            assert!(e.starts_with(error), "{e}");
        }
        assert_eq!(parse(serde_json::json!([]), None), Ok(None));
        assert_eq!(parse(serde_json::json!([f("a")]), Some("none".into())), Ok(Some(ToolChoice::None)));
        assert_eq!(parse(serde_json::json!([f("a")]), Some("required".into())), Ok(Some(ToolChoice::Required)));
        // A tokenizer without DeepSeek-V3's markers cannot be read for calls.
        let mut json = crate::tokenizer::fixture::json();
        json["added_tokens"].as_array_mut().unwrap().retain(|a| !a["content"].as_str().unwrap().contains("tool▁"));
        let bare = Tokenizer::from_json(&json.to_string(), None).unwrap();
        let e = Tools::parse(Some(&weather()), None, None, &bare).unwrap_err();
        assert_eq!(e, format!("tools: the tokenizer has no {CALLS_BEGIN} token (DeepSeek-V3's tool-call markers)"));
    }

    /// Completions read back: content before the calls, each call's name and arguments; cut
    /// short or malformed, no calls.
    #[test]
    fn completions_split_into_content_and_calls() {
        let t = fixture();
        let eos = t.token_id("<｜end▁of▁sentence｜>").unwrap();
        let ids = |text: &str| {
            let mut ids = t.encode(text, false);
            ids.push(eos);
            ids
        };
        let w = call("get_weather", r#"{"city": "Paris"}"#);
        let text = format!("Let me look.{CALLS_BEGIN}{w}\n{}{CALLS_END}", call("now", "{}"));
        let (content, calls) = split_calls(&t, &ids(&text), ToolFormat::DeepSeekV3).unwrap();
        assert_eq!(content, "Let me look.");
        assert_eq!(
            calls,
            vec![
                ToolCall { name: "get_weather".into(), arguments: r#"{"city": "Paris"}"#.into() },
                ToolCall { name: "now".into(), arguments: "{}".into() }
            ]
        );
        // The closing marker left out at the end: the calls still read.
        let (_, calls) = split_calls(&t, &ids(&format!("{CALLS_BEGIN}{w}")), ToolFormat::DeepSeekV3).unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(split_calls(&t, &ids("no calls here"), ToolFormat::DeepSeekV3), None);
        assert_eq!(
            split_calls(&t, &ids(&format!("{CALLS_BEGIN}{}", &w[..w.find(CALL_END).unwrap()])), ToolFormat::DeepSeekV3),
            None
        );
        assert_eq!(split_calls(&t, &ids(&format!("{CALLS_BEGIN}garbage{CALLS_END}")), ToolFormat::DeepSeekV3), None);
        // DeepSeek-V3.1's: the name, then the arguments as they are.
        let v31 = format!("Hm.{CALLS_BEGIN}{CALL_BEGIN}now{SEP}{{}}{CALL_END}{CALL_BEGIN}get_weather{SEP}{{\"city\": \"Oslo\"}}{CALL_END}{CALLS_END}");
        let (content, v31) = split_calls(&t, &ids(&v31), ToolFormat::DeepSeekV31).unwrap();
        assert_eq!(content, "Hm.");
        assert_eq!(v31[1], ToolCall { name: "get_weather".into(), arguments: r#"{"city": "Oslo"}"#.into() });
        let json = calls_json(7, &calls);
        assert_eq!(json[0]["id"], "call_7_0");
        assert_eq!(json[0]["function"]["name"], "get_weather");
    }

    proptest::proptest! {
        /// Any tokens (markers among them) read without panicking; calls written after any
        /// content read back as written, in either format.
        #[test]
        fn completions_read_back_what_was_written(
            noise in proptest::collection::vec(0u32..980, 0..40),
            content in "[a-z .,!]{0,20}",
            calls in proptest::collection::vec(("[a-z_]{1,8}", "\\{(\"[a-z]{1,3}\": [0-9]{1,3})?\\}"), 1..4),
            v31 in proptest::bool::ANY,
        ) {
            let t = fixture();
            let format = if v31 { ToolFormat::DeepSeekV31 } else { ToolFormat::DeepSeekV3 };
            let _ = split_calls(&t, &noise, format);
            let written: Vec<String> = calls.iter().map(|(n, a)| format.call(str::to_string, n, a).concat()).collect();
            let text = format!("{content}{CALLS_BEGIN}{}{CALLS_END}", written.join("\n"));
            let tokens = t.encode(&text, false);
            let (got, read) = split_calls(&t, &tokens, format).unwrap();
            proptest::prop_assert_eq!(got, content);
            let want: Vec<ToolCall> =
                calls.iter().map(|(n, a)| ToolCall { name: n.clone(), arguments: a.clone() }).collect();
            proptest::prop_assert_eq!(&read, &want);
            // Followed a token at a time: the same calls.
            proptest::prop_assert_eq!(followed(&t, &tokens, format), (want, calls.len()));
        }

        /// Followed a token at a time, calls whose arguments are any text — spaces, fences,
        /// backticks, `<` and non-ASCII inside and around them — say what the whole completion's
        /// reading reads, token boundaries wherever the tokenizer puts them, the markers tokens
        /// or spelled out (as the tiny model wrote one over HTTP).
        #[test]
        fn calls_followed_as_they_come_add_up_to_the_whole(
            calls in proptest::collection::vec(("[a-z_ ]{1,8}", "[ \n`a{}\":,<｜é😀]{0,24}"), 1..4),
            between in "[ \n]{0,2}",
            v31 in proptest::bool::ANY,
            spelled in proptest::bool::ANY,
            cut in 0usize..200,
        ) {
            let t = fixture();
            let format = if v31 { ToolFormat::DeepSeekV31 } else { ToolFormat::DeepSeekV3 };
            let written: Vec<String> = calls.iter().map(|(n, a)| format.call(str::to_string, n, a).concat()).collect();
            let text = format!("{CALLS_BEGIN}{}{CALLS_END}", written.join(&between));
            // The markers as their tokens, or (as a model may write them) spelled out.
            let tokens = match spelled {
                false => t.encode(&text, false),
                true => text.chars().flat_map(|c| t.encode(&c.to_string(), false)).collect(),
            };
            if let Some((_, read)) = split_calls(&t, &tokens, format) {
                let (got, ended) = followed(&t, &tokens, format);
                proptest::prop_assert_eq!(ended, read.len());
                proptest::prop_assert_eq!(&got[..read.len()], &read[..]);
            }
            // Cut short anywhere: what was said is a beginning of what the whole says.
            let (whole, _) = followed(&t, &tokens, format);
            let (part, _) = followed(&t, &tokens[..cut.min(tokens.len())], format);
            for (p, w) in part.iter().zip(&whole) {
                proptest::prop_assert_eq!(&p.name, &w.name);
                proptest::prop_assert!(w.arguments.starts_with(&p.arguments), "{:?} {:?}", p, w);
            }
        }
    }

    /// `tokens` fed to a [`CallStream`] one by one: each call it started, with its arguments'
    /// text put together, and how many ended.
    fn followed(t: &Tokenizer, tokens: &[u32], format: ToolFormat) -> (Vec<ToolCall>, usize) {
        let mut stream = CallStream::new(format);
        let (mut calls, mut ended) = (Vec::<ToolCall>::new(), 0);
        for &tok in tokens {
            for e in stream.push(t, tok) {
                match e {
                    CallEvent::Start { index, name } => {
                        assert_eq!(index, calls.len());
                        calls.push(ToolCall { name, arguments: String::new() });
                    }
                    CallEvent::Arguments { index, text } => calls[index].arguments.push_str(&text),
                    CallEvent::End { index } => {
                        assert_eq!(index, ended);
                        ended += 1;
                    }
                }
            }
        }
        (calls, ended)
    }

    /// Sampling from random logits under each tool choice: `required` and a named function always
    /// write well-formed calls of the right functions whose arguments parse; `none` never opens
    /// calls; `auto` is free until the model opens them, then held.
    #[test]
    fn constrained_sampling_writes_calls() {
        let t = fixture();
        let eos = t.token_id("<｜end▁of▁sentence｜>").unwrap();
        let vocab = t.vocab_size();
        let mut state = 7u64;
        let mut random = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let named = serde_json::json!({"type": "function", "function": {"name": "get_weather"}});
        let (mut ended, mut auto_calls, mut auto_plain) = (0, 0, 0);
        let choices = [(Some(Value::from("required")), 40), (Some(named), 40), (Some("none".into()), 20), (None, 40)];
        for ((choice, trials), format) in
            choices.iter().flat_map(|c| [ToolFormat::DeepSeekV3, ToolFormat::DeepSeekV31].map(|f| (c, f)))
        {
            let tools = Tools { format, ..Tools::parse(Some(&weather()), choice.as_ref(), None, &t).unwrap().unwrap() };
            for trial in 0..*trials {
                let mut c = tools.constraint(&t, eos).unwrap();
                let mut tokens = Vec::new();
                for _ in 0..120 {
                    // Closing bytes likelier, so that calls end within the budget; in auto mode
                    // the opening marker sometimes likeliest.
                    let mut logits: Vec<f32> = (0..vocab as u32)
                        .map(|i| {
                            let b = t.token_bytes_of(i);
                            let lean = if b.contains(&b'}') || b.contains(&b'"') || i == eos { 2.0 } else { 0.0 };
                            lean + 4.0 * random()
                        })
                        .collect();
                    if trial % 2 == 0 {
                        logits[tools.trigger as usize] = 10.0;
                        for m in [CALL_BEGIN, SEP, CALL_END, CALLS_END] {
                            logits[t.token_id(m).unwrap() as usize] = 6.0;
                        }
                    }
                    c.mask(&mut logits);
                    let best = (0..vocab).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32;
                    assert!(logits[best as usize].is_finite(), "{choice:?}: nothing allowed after {tokens:?}");
                    tokens.push(best);
                    c.advance(best);
                    if best == eos {
                        break;
                    }
                }
                let opened = tokens.contains(&tools.trigger);
                match &tools.choice {
                    ToolChoice::None => {
                        assert!(!opened);
                        continue;
                    }
                    ToolChoice::Auto if !opened => {
                        auto_plain += 1;
                        continue;
                    }
                    ToolChoice::Auto => auto_calls += 1,
                    _ => {}
                }
                if tokens.last() != Some(&eos) {
                    continue;
                }
                ended += 1;
                let (content, calls) =
                    split_calls(&t, &tokens, format).unwrap_or_else(|| panic!("{:?}", t.decode(&tokens, false)));
                if tools.choice != ToolChoice::Auto {
                    assert_eq!(content, "");
                }
                assert!(!calls.is_empty());
                for call in &calls {
                    let args: serde_json::Map<String, Value> = serde_json::from_str(&call.arguments).unwrap();
                    match call.name.as_str() {
                        "get_weather" => assert!(args["city"].is_string() && args.len() <= 2, "{args:?}"),
                        "now" => assert!(args.is_empty() && tools.choice != ToolChoice::Function("get_weather".into())),
                        other => panic!("{other}"),
                    }
                }
            }
        }
        assert!(ended >= 80 && auto_calls >= 10 && auto_plain >= 10, "{ended} ended; auto: {auto_calls} {auto_plain}");
    }
}
