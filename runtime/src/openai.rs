//! OpenAI's completions and chat completions (`POST /v1/completions`, `POST /v1/chat/completions`)
//! over [`crate::http`]'s server: their bodies read into the serving loop's requests (each choice
//! one), their replies written as OpenAI's objects — whole, or streamed as chunks as the tokens
//! come — and the pieces the other APIs' replies share (a reply's calls, tokens' logprobs).

use std::io::Write;
use std::sync::{mpsc, Arc};

use crate::cli::RequestDefaults;
use crate::http::{
    call_id, now, queue, respond, respond_error, wait, Conn, Message, Pending, Site, ToLoop, EVENT_STREAM,
};
use crate::route::{RouteEnd, Routed, Router, Scored};
use crate::session::{generation_text, Ending, Generation, Progress, Request};
use crate::tokenizer::Tokenizer;

/// The two APIs served: OpenAI's completions and chat completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/completions`: a prompt (text or token ids), `text` back.
    Completions,
    /// `POST /v1/chat/completions`: `messages` written by the chat template, a `message` back.
    Chat,
}

/// A completion request's body as the serving loop takes it, and whether it streams. OpenAI's
/// fields: `prompt` (text or token ids: one, or one in an array), `max_tokens`, `temperature`,
/// `top_p`, `seed`, `stop` (strings, or token id sequences), `logprobs` (true: the chosen token's; a count:
/// that many alternatives' too, at most [`crate::cli::MAX_TOP_LOGPROBS`]), `stream`; `model`, `n` (1), `user` and `echo` (false) are accepted and the
/// others refused by name. What a request leaves out comes from `defaults`.
pub fn completion_request(
    body: &[u8],
    defaults: &RequestDefaults,
    tokenizer: Option<&Arc<Tokenizer>>,
) -> Result<ApiRequest, String> {
    api_request(Api::Completions, body, defaults, tokenizer)
}

/// A body's requests, one a choice in the reply's order (each prompt's `n` together), and
/// whether the reply streams (one choice only).
#[derive(Debug)]
pub struct ApiRequest {
    pub requests: Vec<Request>,
    pub stream: bool,
    /// `stream_options.include_usage`: a streamed reply's last chunk says the usage.
    pub usage: bool,
    /// Choices a prompt.
    pub n: usize,
}

/// Fields clients send that change nothing here, taken (as OpenAI's API takes them): `metadata`
/// and `store` (nothing is stored), `service_tier`, `safety_identifier`, and `prompt_cache_key`
/// and `prompt_cache_retention` (the server reuses the whole cache pages a prompt shares with
/// earlier ones anyway).
const NO_EFFECT: [&str; 6] =
    ["metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention"];

/// The most choices one body asks for (prompts times `n`).
pub const MAX_CHOICES: usize = 128;

/// A chat completion request's body as the serving loop takes it, and whether it streams: as
/// [`completion_request`] with `messages` (the conversation, which the tokenizer's chat template
/// writes with the assistant's turn opened) for `prompt`, `max_completion_tokens` (or
/// `max_tokens`), `logprobs` true and `top_logprobs` K, `tools`, `tool_choice` and
/// `parallel_tool_calls`; no `echo`.
pub fn chat_request(
    body: &[u8],
    defaults: &RequestDefaults,
    tokenizer: Option<&Arc<Tokenizer>>,
) -> Result<ApiRequest, String> {
    api_request(Api::Chat, body, defaults, tokenizer)
}

pub(crate) fn api_request(
    api: Api,
    body: &[u8],
    defaults: &RequestDefaults,
    tokenizer: Option<&Arc<Tokenizer>>,
) -> Result<ApiRequest, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not a JSON body: {e}"))?;
    let o = v.as_object().ok_or("the body is not a JSON object")?;
    const COMMON: [&str; 11] = [
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "logprobs",
        "stream",
        "stream_options",
        "model",
        "n",
        "user",
    ];
    let own: &[&str] = match api {
        Api::Completions => &["prompt", "echo"],
        Api::Chat => &["messages", "max_completion_tokens", "top_logprobs"],
    };
    let chat: &[&str] = if api == Api::Chat { &crate::cli::CHAT_FIELDS } else { &[] };
    let fields: Vec<&str> =
        own.iter().chain(chat).chain(&COMMON).chain(&crate::cli::SAMPLING_FIELDS).chain(&NO_EFFECT).copied().collect();
    if let Some(k) = o.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(format!("unknown field '{k}' ({})", fields.join(", ")));
    }
    let n = match o.get("n") {
        None | Some(serde_json::Value::Null) => 1,
        Some(x) => x.as_u64().filter(|&n| n >= 1).ok_or_else(|| format!("n: {x} is not a positive count"))? as usize,
    };

    let needs_tokenizer =
        |what: &str| format!("{what} needs a tokenizer (v3r serve --tokenizer FILE, or tokenizer.json in --weights)");
    // The serve lines' fields (a prompt each), which [`crate::cli::parse_request`] checks.
    let mut lines: Vec<serde_json::Value> = match api {
        Api::Completions => {
            // A prompt (text or token ids), or an array of them.
            let prompts = match o.get("prompt") {
                None => return Err("no \"prompt\" (text, or token ids)".into()),
                Some(serde_json::Value::Array(a))
                    if !a.is_empty() && a.iter().all(|p| p.is_array() || p.is_string()) =>
                {
                    a.clone()
                }
                Some(p) => vec![p.clone()],
            };
            let mut lines = Vec::new();
            for p in prompts {
                lines.push(match p {
                    serde_json::Value::String(_) if tokenizer.is_none() => {
                        return Err(format!("prompt: {}; or give token ids", needs_tokenizer("text")))
                    }
                    serde_json::Value::String(_) => serde_json::json!({ "text": p }),
                    _ => serde_json::json!({ "prompt": p }),
                });
            }
            lines
        }
        Api::Chat => {
            let messages = o.get("messages").ok_or("no \"messages\"")?;
            match tokenizer {
                Some(t) if t.has_chat_template() => {
                    let mut line = serde_json::json!({ "messages": messages });
                    for k in crate::cli::CHAT_FIELDS {
                        if let Some(x) = o.get(k).filter(|x| !x.is_null()) {
                            line[k] = x.clone();
                        }
                    }
                    vec![line]
                }
                _ => {
                    return Err(format!(
                        "messages: {} with a chat template (its tokenizer_config.json)",
                        needs_tokenizer("chat")
                    ))
                }
            }
        }
    };
    if lines.len() * n > MAX_CHOICES {
        return Err(format!("{} prompts x n {n}: at most {MAX_CHOICES} choices a request", lines.len()));
    }
    let mut line = serde_json::json!({});
    let max_tokens = o.get("max_completion_tokens").filter(|x| !x.is_null()).or(o.get("max_tokens"));
    let same = ["temperature", "top_p"].iter().chain(&crate::cli::SAMPLING_FIELDS).map(|&k| (k, o.get(k)));
    for (ours, x) in [("max_new_tokens", max_tokens)].into_iter().chain(same) {
        if let Some(x) = x.filter(|x| !x.is_null()) {
            line[ours] = x.clone();
        }
    }
    if let Some(x) = o.get("seed").filter(|x| !x.is_null()) {
        line["seed"] = x.clone();
    }
    // Strings (OpenAI's) or token id sequences.
    match o.get("stop") {
        None | Some(serde_json::Value::Null) => {}
        Some(x @ serde_json::Value::String(_)) => line["stop_text"] = x.clone(),
        Some(serde_json::Value::Array(a)) if !a.is_empty() && a.iter().all(|x| x.is_string()) => {
            line["stop_text"] = a.clone().into()
        }
        Some(x) => line["stop"] = x.clone(),
    }
    match (api, o.get("logprobs")) {
        (_, None | Some(serde_json::Value::Null)) => {}
        (_, Some(serde_json::Value::Bool(b))) => line["logprobs"] = (*b).into(),
        // A count: the chosen token's and that many alternatives' at each step.
        (Api::Completions, Some(n)) if n.as_u64().is_some() => {
            line["logprobs"] = true.into();
            line["top_logprobs"] = n.clone();
        }
        (Api::Completions, Some(x)) => return Err(format!("logprobs: {x} is not true, false or a count")),
        (Api::Chat, Some(x)) => return Err(format!("logprobs: {x} is not true or false")),
    }
    // The prompt's tokens before the completion's, scored where log-probabilities are asked for.
    match o.get("echo") {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {}
        Some(serde_json::Value::Bool(true)) => line["echo"] = true.into(),
        Some(x) => return Err(format!("echo: {x} is not true or false")),
    }
    if let Some(k) = o.get("top_logprobs").filter(|x| !x.is_null()) {
        if o.get("logprobs").and_then(serde_json::Value::as_bool) != Some(true) {
            return Err("top_logprobs: only with \"logprobs\": true".into());
        }
        line["top_logprobs"] = k.clone();
    }
    let stream = match o.get("stream") {
        None | Some(serde_json::Value::Null) => false,
        Some(x) => x.as_bool().ok_or_else(|| format!("stream: {x} is not true or false"))?,
    };
    let usage = match o.get("stream_options") {
        None | Some(serde_json::Value::Null) => false,
        Some(_) if !stream => return Err("stream_options: only with \"stream\": true".into()),
        Some(serde_json::Value::Object(x)) => {
            match (x.keys().find(|k| *k != "include_usage"), x.get("include_usage")) {
                (Some(k), _) => return Err(format!("stream_options: unknown field '{k}' (include_usage)")),
                (None, None | Some(serde_json::Value::Null)) => false,
                (None, Some(b)) => {
                    b.as_bool().ok_or_else(|| format!("stream_options.include_usage: {b} is not true or false"))?
                }
            }
        }
        Some(x) => return Err(format!("stream_options: {x} is not an object")),
    };
    // Each choice of a prompt its own seed: the given one (or the default) plus its number.
    let seed = match line.get("seed") {
        Some(x) => x.as_u64().ok_or_else(|| format!("seed: {x} is not a whole number"))?,
        None => defaults.seed,
    };
    let mut requests = Vec::with_capacity(lines.len() * n);
    for prompt in lines.iter_mut() {
        for k in 0..n as u64 {
            let mut one = line.clone();
            for (key, value) in prompt.as_object().into_iter().flatten() {
                one[key] = value.clone();
            }
            one["seed"] = (seed + k).into();
            let (_, request) = crate::cli::parse_request(&one.to_string(), defaults, tokenizer).map_err(|e| {
                // Named as this API names them.
                let e = e.replacen("stop_text:", "stop:", 1).replacen("max_new_tokens:", "max_tokens:", 1);
                match api {
                    Api::Completions => e.replacen("text:", "prompt:", 1),
                    Api::Chat => e,
                }
            })?;
            requests.push(request);
        }
    }
    Ok(ApiRequest { requests, stream, n, usage })
}

/// OpenAI's `finish_reason`: an end token or stop sequence is `stop`, the token budget `length`.
pub(crate) fn finish_reason(g: &Generation) -> &'static str {
    match g.ending {
        Some(Ending::Eos) | Some(Ending::Stop) => "stop",
        Some(Ending::Length) => "length",
        None => "cancelled",
    }
}

/// A reply's JSON: `object` (text_completion, chat.completion), its choices, and OpenAI's
/// `usage` — each distinct prompt's tokens counted once (`prompt_tokens`), every choice's
/// generated ones, and the prompt tokens whose cache rows were shared.
pub fn reply_json(
    id: &str,
    object: &str,
    model: &str,
    created: u64,
    choices: Vec<serde_json::Value>,
    prompt_tokens: usize,
    generations: &[&Generation],
) -> serde_json::Value {
    let completion: usize = generations.iter().map(|g| g.tokens.len()).sum();
    let cached: usize = generations.iter().map(|g| g.reused).sum();
    serde_json::json!({
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "cached_prompt_tokens": cached,
            "prompt_tokens_details": { "cached_tokens": cached },
        },
    })
}

/// A completion's choice number `index`; `echoed`: the prompt's tokens come first (in `tokens`
/// and, where scored, the log-probabilities: the first token's null).
pub fn completion_choice(index: usize, prompt: &[u32], echoed: bool, g: &Generation, text: &str) -> serde_json::Value {
    let scored = !g.logprobs.is_empty() || !g.prompt_logprobs.is_empty();
    let (mut tokens, mut lps, mut top) = (Vec::new(), Vec::new(), Vec::new());
    if echoed {
        tokens.extend_from_slice(prompt);
        if scored {
            lps.push(serde_json::Value::Null);
            lps.extend(g.prompt_logprobs.iter().map(|&x| serde_json::json!(x)));
            if !g.prompt_top_logprobs.is_empty() {
                top.push(serde_json::Value::Null);
                top.extend(g.prompt_top_logprobs.iter().map(|a| alternatives(a)));
            }
        }
    }
    tokens.extend_from_slice(&g.tokens);
    lps.extend(g.logprobs.iter().map(|&x| serde_json::json!(x)));
    top.extend(g.top_logprobs.iter().map(|a| alternatives(a)));
    let logprobs = match scored {
        false => serde_json::Value::Null,
        true => {
            let top = if top.is_empty() { serde_json::Value::Null } else { top.into() };
            serde_json::json!({ "tokens": tokens, "token_logprobs": lps, "top_logprobs": top })
        }
    };
    serde_json::json!({
        "index": index,
        "text": text,
        "tokens": tokens,
        "logprobs": logprobs,
        "finish_reason": finish_reason(g),
    })
}

/// The completions API's alternatives at a step: an object of token (its id) -> log-probability.
fn alternatives(alts: &[(u32, f32)]) -> serde_json::Value {
    alts.iter().map(|(t, lp)| (t.to_string(), serde_json::json!(lp))).collect::<serde_json::Map<_, _>>().into()
}

/// The chat API's log-probability entry of token `t`: its text, bytes, id, and its alternatives'.
pub(crate) fn chat_token(tokenizer: &Tokenizer, t: u32, lp: f32, alts: &[(u32, f32)]) -> serde_json::Value {
    let one = |t: u32, lp: f32| {
        let bytes = tokenizer.token_bytes_of(t);
        serde_json::json!({ "token": String::from_utf8_lossy(&bytes), "logprob": lp, "bytes": bytes, "id": t })
    };
    let mut entry = one(t, lp);
    entry["top_logprobs"] = alts.iter().map(|&(a, alp)| one(a, alp)).collect();
    entry
}

/// A streamed token's log-probabilities in `api`'s shape.
fn streamed_logprobs(
    api: Api,
    tokenizer: Option<&Arc<Tokenizer>>,
    t: u32,
    lp: f32,
    alts: &[(u32, f32)],
) -> serde_json::Value {
    match (api, tokenizer) {
        (Api::Chat, Some(tok)) => serde_json::json!({ "content": [chat_token(tok, t, lp, alts)] }),
        _ => {
            let top = if alts.is_empty() { serde_json::Value::Null } else { vec![alternatives(alts)].into() };
            serde_json::json!({ "tokens": [t], "token_logprobs": [lp], "top_logprobs": top })
        }
    }
}

/// A chat completion's calls of its tools: the content before them, and OpenAI's `tool_calls`.
#[derive(Debug, Clone)]
pub struct Called {
    pub content: String,
    pub tool_calls: serde_json::Value,
}

/// The calls a chat completion (request number `number`, which may call `tools`; `tokens`: its
/// answer's) made, if it was read for calls and they are well formed.
pub fn called(
    tools: Option<&crate::tools::Tools>,
    tokenizer: &Tokenizer,
    number: usize,
    tokens: &[u32],
) -> Option<Called> {
    let tools = tools.filter(|t| t.calling())?;
    let (content, calls) = crate::tools::split_calls(tokenizer, tokens, tools.format)?;
    let tool_calls = crate::tools::calls_json(number, &calls);
    (!calls.is_empty()).then_some(Called { content, tool_calls })
}

/// OpenAI's `finish_reason` of a chat completion: `tool_calls` when it ended having called.
fn chat_finish(g: &Generation, called: bool) -> &'static str {
    match (called, finish_reason(g)) {
        (true, "stop") => "tool_calls",
        (_, reason) => reason,
    }
}

/// A chat completion's choice number `index`: the assistant's message (with `called`, its
/// content before them, null if none, and its `tool_calls`; with `reasoning`, its
/// `reasoning_content`), its tokens (in `tokens`), and with log-probabilities each token's text,
/// bytes and alternatives.
pub fn chat_choice(
    index: usize,
    g: &Generation,
    text: &str,
    tokenizer: &Tokenizer,
    called: Option<&Called>,
    reasoning: Option<&str>,
) -> serde_json::Value {
    let logprobs = match g.logprobs.is_empty() {
        true => serde_json::Value::Null,
        false => {
            let content: Vec<serde_json::Value> = g
                .tokens
                .iter()
                .zip(&g.logprobs)
                .enumerate()
                .map(|(k, (&t, &lp))| {
                    chat_token(tokenizer, t, lp, g.top_logprobs.get(k).map_or(&[][..], Vec::as_slice))
                })
                .collect();
            serde_json::json!({ "content": content })
        }
    };
    let mut message = match called {
        None => serde_json::json!({ "role": "assistant", "content": text }),
        Some(c) => {
            let content = if c.content.is_empty() { serde_json::Value::Null } else { c.content.clone().into() };
            serde_json::json!({ "role": "assistant", "content": content, "tool_calls": c.tool_calls })
        }
    };
    if let Some(r) = reasoning {
        message["reasoning_content"] = r.into();
    }
    serde_json::json!({
        "index": index,
        "message": message,
        "tokens": g.tokens,
        "logprobs": logprobs,
        "finish_reason": chat_finish(g, called.is_some()),
    })
}

/// One streamed chunk: a token and the text it settles, or (`finish`) the end and the rest.
fn chunk_json(
    api: Api,
    id: &str,
    model: &str,
    created: u64,
    token: Option<u32>,
    text: &str,
    finish: Option<&str>,
) -> serde_json::Value {
    let tokens: Vec<u32> = token.into_iter().collect();
    let (object, choice) = match api {
        Api::Completions => (
            "text_completion",
            serde_json::json!({ "index": 0, "text": text, "tokens": tokens, "finish_reason": finish }),
        ),
        // The end's delta is empty unless held-back text is left.
        Api::Chat => {
            let delta = match (finish, text.is_empty()) {
                (Some(_), true) => serde_json::json!({}),
                _ => serde_json::json!({ "content": text }),
            };
            (
                "chat.completion.chunk",
                serde_json::json!({ "index": 0, "delta": delta, "tokens": tokens, "finish_reason": finish }),
            )
        }
    };
    serde_json::json!({ "id": id, "object": object, "created": created, "model": model, "choices": [choice] })
}

/// A completion: parsed, queued (each choice a request of its own), answered whole or streamed.
pub(crate) fn answer(api: Api, conn: &mut Conn, body: &[u8], tx: &ToLoop, site: &Site) {
    let (tokenizer, model) = (site.tokenizer.as_ref(), site.model.as_str());
    let ApiRequest { requests, stream: streaming, n, usage } = match api_request(api, body, &site.defaults, tokenizer) {
        Ok(r) => r,
        Err(e) => {
            let _ = respond_error(conn, "400 Bad Request", &e);
            return;
        }
    };
    let mut pending = Vec::with_capacity(requests.len());
    for request in requests {
        let Some(p) = queue(api, request, tx) else {
            let _ = respond_error(conn, "503 Service Unavailable", "the server is stopping");
            return;
        };
        pending.push(p);
    }
    let (kind, object) = match api {
        Api::Completions => ("cmpl", "text_completion"),
        Api::Chat => ("chatcmpl", "chat.completion"),
    };
    let (id, created) = (format!("{kind}-{}", pending[0].number), now());
    // The prompt's text first where it is echoed.
    let prompt_text = |p: &Pending| match (p.echoed, tokenizer) {
        (true, Some(t)) => t.decode(&p.prompt, true),
        _ => String::new(),
    };
    if streaming {
        let prompt_tokens: usize = pending.iter().step_by(n.max(1)).map(|p| p.prompt.len()).sum();
        let usage = usage.then_some(prompt_tokens);
        stream_choices(api, conn, &mut pending, tx, site, (&id, created), usage);
        return;
    }
    // Every choice's end, in order; a refused one refuses the reply (the others cancelled).
    let mut ended = Vec::with_capacity(pending.len());
    for (k, p) in pending.iter().enumerate() {
        match wait(p) {
            Ok(g) => ended.push(g),
            Err((status, e)) => {
                for other in &pending[k + 1..] {
                    let _ = tx.send((Message::Gone(other.number), None));
                }
                let _ = respond_error(conn, status, &e);
                return;
            }
        }
    }
    let choices: Vec<serde_json::Value> = pending
        .iter()
        .zip(&ended)
        .enumerate()
        .map(|(k, (p, g))| match (api, tokenizer) {
            (Api::Chat, Some(t)) => {
                let w = p.whole(g, t);
                chat_choice(k, g, &w.text, t, w.called.as_ref(), w.thought.as_deref())
            }
            _ => {
                let text = tokenizer.map_or(String::new(), |t| generation_text(t, &g.tokens, p.stops.as_ref()));
                completion_choice(k, &p.prompt, p.echoed, g, &(prompt_text(p) + &text))
            }
        })
        .collect();
    // Each prompt's tokens once, however many choices it has.
    let prompt_tokens: usize = pending.iter().step_by(n.max(1)).map(|p| p.prompt.len()).sum();
    let generations: Vec<&Generation> = ended.iter().collect();
    let _ = respond(conn, "200 OK", &reply_json(&id, object, model, created, choices, prompt_tokens, &generations));
}

/// Chat chunks' `tool_calls` deltas of calls as they are written (request `number`'s): a call's
/// first names its id, type and function with empty arguments, the next add to its arguments.
fn call_deltas(number: usize, events: &[crate::tools::CallEvent]) -> Vec<serde_json::Value> {
    use crate::tools::CallEvent;
    events
        .iter()
        .filter_map(|e| match e {
            CallEvent::Start { index, name } => {
                Some(serde_json::json!({ "index": index, "id": call_id(number, *index),
                "type": "function", "function": { "name": name, "arguments": "" } }))
            }
            CallEvent::Arguments { index, text } => {
                Some(serde_json::json!({ "index": index, "function": { "arguments": text } }))
            }
            CallEvent::End { .. } => None,
        })
        .collect()
}

/// Streams a completion's choices as server-sent events as their tokens come, each chunk naming
/// its choice (`index`), then (with `usage`: the prompts' tokens) a chunk of no choices with the
/// usage of them all, then `data: [DONE]`. A refused choice ends the stream with its error (the
/// others cancelled); a client that goes away cancels every choice still running.
fn stream_choices(
    api: Api,
    conn: &mut Conn,
    pending: &mut [Pending],
    tx: &ToLoop,
    site: &Site,
    (id, created): (&str, u64),
    usage: Option<usize>,
) {
    let (tokenizer, model) = (site.tokenizer.as_ref(), site.model.as_str());
    // A stream ends with its connection.
    conn.keep = false;
    let stream = &mut conn.stream;
    let mut write = |text: &str| stream.write_all(text.as_bytes()).and_then(|_| stream.flush()).is_ok();
    // Every chunk says `usage` when it is asked for (null until the last), as OpenAI's do.
    let event = |data: &serde_json::Value| {
        let mut data = data.clone();
        if usage.is_some() && data.get("usage").is_none() {
            data["usage"] = serde_json::Value::Null;
        }
        format!("data: {data}\n\n")
    };
    let mut gone = !write(EVENT_STREAM);
    let chunk = |k: usize, token: Option<u32>, text: &str, finish: Option<&str>| {
        let mut c = chunk_json(api, id, model, created, token, text, finish);
        c["choices"][0]["index"] = k.into();
        c
    };
    for (k, p) in pending.iter().enumerate() {
        if api == Api::Chat && !gone {
            // The role first, as OpenAI's streams begin.
            let mut first = chunk(k, None, "", None);
            first["choices"][0]["delta"] = serde_json::json!({ "role": "assistant", "content": "" });
            gone = !write(&event(&first));
        }
        if p.echoed && !gone {
            // The echoed prompt first: its text and tokens.
            let text = tokenizer.map_or(String::new(), |t| t.decode(&p.prompt, true));
            let mut first = chunk(k, None, &text, None);
            first["choices"][0]["tokens"] = p.prompt.clone().into();
            gone = !write(&event(&first));
        }
    }
    // Every choice's events into one channel, tagged with its index, in the order they come.
    let (merged_tx, merged) = mpsc::channel::<(usize, Progress)>();
    let sources: Vec<mpsc::Receiver<Progress>> =
        pending.iter_mut().map(|p| std::mem::replace(&mut p.events, mpsc::channel().1)).collect();
    std::thread::scope(|scope| {
        for (k, source) in sources.into_iter().enumerate() {
            let merged_tx = merged_tx.clone();
            scope.spawn(move || {
                for event in source.iter() {
                    let end = matches!(event, Progress::Ended(_) | Progress::Cancelled(_) | Progress::Refused(_));
                    if merged_tx.send((k, event)).is_err() || end {
                        break;
                    }
                }
            });
        }
        drop(merged_tx);
        // Each choice's tokens routed: a chat's into reasoning, content and calls.
        let chat = api == Api::Chat;
        let mut routers: Vec<Option<Router>> = pending
            .iter()
            .map(|p| {
                let (reasoning, tools) = if chat { (p.reasoning, p.tools.as_deref()) } else { (None, None) };
                Some(Router::new(tokenizer, p.stops.as_ref(), reasoning, tools))
            })
            .collect();
        // Each choice's log-probability and alternatives, for its token to come.
        let mut scored: Vec<Scored> = vec![None; pending.len()];
        let mut ended: Vec<Option<Generation>> = vec![None; pending.len()];
        let mut failed = false;
        let cancel_running = |ended: &[Option<Generation>]| {
            for (p, e) in pending.iter().zip(ended) {
                if e.is_none() {
                    let _ = tx.send((Message::Gone(p.number), None));
                }
            }
        };
        let logprobs = |c: &mut serde_json::Value, token: Option<u32>, scored: Scored| {
            if let (Some(t), Some((lp, alts))) = (token, scored) {
                c["choices"][0]["logprobs"] = streamed_logprobs(api, tokenizer, t, lp, &alts);
            }
        };
        for (k, progress) in merged.iter() {
            let chunks: Vec<serde_json::Value> = match progress {
                // The token that follows carries them.
                Progress::Scored(lp, alts) => {
                    scored[k] = Some((lp, alts));
                    continue;
                }
                Progress::Token(t) => {
                    let Some(router) = routers[k].as_mut() else { continue };
                    let mut chunks = Vec::new();
                    let mut calls = Vec::new();
                    for r in router.token(t, scored[k].take()) {
                        match r {
                            Routed::Think { text, token, scored } if !text.is_empty() || token.is_some() => {
                                let mut c = chunk(k, token, "", None);
                                c["choices"][0]["delta"] = serde_json::json!({ "reasoning_content": text });
                                logprobs(&mut c, token, scored);
                                chunks.push(c);
                            }
                            Routed::ThinkEnd(text) if !text.is_empty() => {
                                let mut c = chunk(k, None, "", None);
                                c["choices"][0]["delta"] = serde_json::json!({ "reasoning_content": text });
                                chunks.push(c);
                            }
                            Routed::Think { .. } | Routed::ThinkEnd(_) => {}
                            // Held-back content said when the calls open (only if any).
                            Routed::Say { text, token: None, .. } if text.is_empty() => {}
                            Routed::Say { text, token, scored } => {
                                let mut c = chunk(k, token, &text, None);
                                logprobs(&mut c, token, scored);
                                chunks.push(c);
                            }
                            Routed::Call(e) => calls.push(e),
                        }
                    }
                    // In the calls: their starts and arguments' text as they come.
                    let deltas = call_deltas(pending[k].number, &calls);
                    if !deltas.is_empty() {
                        let mut c = chunk(k, Some(t), "", None);
                        c["choices"][0]["delta"] = serde_json::json!({ "tool_calls": deltas });
                        chunks.push(c);
                    }
                    chunks
                }
                Progress::Ended(g) | Progress::Cancelled(g) => {
                    let RouteEnd { called, thought, rest, .. } = match routers[k].take() {
                        Some(r) => r.end(pending[k].number, pending[k].tools.as_deref(), &g.tokens),
                        None => continue,
                    };
                    let mut c = chunk(k, None, &rest, Some(chat_finish(&g, called.is_some())));
                    // A reasoning that never closed: its held-back text.
                    if !thought.is_empty() {
                        c["choices"][0]["delta"]["reasoning_content"] = thought.into();
                    }
                    ended[k] = Some(g);
                    vec![c]
                }
                Progress::Refused(e) => {
                    failed = true;
                    vec![serde_json::json!({ "error": { "message": e, "type": "invalid_request_error" } })]
                }
            };
            for data in chunks {
                if !gone && !write(&event(&data)) {
                    // The client went away: its choices leave the batch.
                    gone = true;
                    cancel_running(&ended);
                }
            }
            if failed {
                cancel_running(&ended);
                break;
            }
            if ended.iter().all(Option::is_some) {
                break;
            }
        }
        if gone {
            return;
        }
        if let (Some(prompt_tokens), false) = (usage, failed) {
            let object = if api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
            let generations: Vec<&Generation> = ended.iter().flatten().collect();
            let _ = write(&event(&reply_json(id, object, model, created, Vec::new(), prompt_tokens, &generations)));
        }
        let _ = write("data: [DONE]\n\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one request of a body that asks for one choice, and whether it streams.
    fn one(a: ApiRequest) -> (Request, bool) {
        assert_eq!((a.requests.len(), a.n), (1, 1));
        (a.requests.into_iter().next().expect("a request"), a.stream)
    }

    fn defaults() -> RequestDefaults {
        RequestDefaults::for_tests()
    }

    /// OpenAI's completion fields map onto a serve request; what this server cannot do is refused
    /// by name.
    #[test]
    fn completion_bodies_become_requests() {
        let body = br#"{"model": "m", "prompt": [[4, 5, 6]], "max_tokens": 3, "temperature": 0.5, "top_p": 0.9,
            "seed": 7, "stop": [[1, 2]], "logprobs": 1, "stream": true, "n": 1}"#;
        let (r, stream) = one(completion_request(body, &defaults(), None).unwrap());
        assert_eq!((r.prompt, r.max_new, r.sampler.temperature, r.sampler.top_p), (vec![4, 5, 6], 3, 0.5, 0.9));
        let usage = br#"{"prompt": [1], "stream": true, "stream_options": {"include_usage": true}}"#;
        assert!(completion_request(usage, &defaults(), None).unwrap().usage);
        let no_usage = br#"{"prompt": [1], "stream": true, "stream_options": {}}"#;
        assert!(!completion_request(no_usage, &defaults(), None).unwrap().usage);
        assert_eq!((r.stop, r.logprobs, r.top_logprobs, stream), (vec![vec![1, 2]], true, 1, true));
        let echoed = br#"{"prompt": [9, 8], "echo": true, "logprobs": 1, "max_tokens": 0}"#;
        let (r, _) = one(completion_request(echoed, &defaults(), None).unwrap());
        assert_eq!((r.echo, r.logprobs, r.top_logprobs, r.max_new), (true, true, 1, 0));
        let (r, stream) =
            one(completion_request(br#"{"prompt": [9], "seed": null, "stop": null}"#, &defaults(), None).unwrap());
        assert_eq!((r.prompt, r.max_new, r.logprobs, stream), (vec![9], 16, false, false));
        // OpenAI's penalties and bias, vLLM's top-k, min-p and repetition penalty.
        let shaped = br#"{"prompt": [9], "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"3": -100},
            "top_k": 8, "min_p": 0.05, "repetition_penalty": 1.1}"#;
        let (r, _) = one(completion_request(shaped, &defaults(), None).unwrap());
        let want = v3c_models::sampling::Shaping {
            top_k: 8,
            min_p: 0.05,
            repetition_penalty: 1.1,
            presence_penalty: 0.5,
            frequency_penalty: -1.0,
            logit_bias: vec![(3, -100.0)],
            ..Default::default()
        };
        assert_eq!(*r.sampler.shaping, want);
        let nulls = br#"{"prompt": [9], "presence_penalty": null, "logit_bias": null, "top_k": null}"#;
        assert_eq!(one(completion_request(nulls, &defaults(), None).unwrap()).0.sampler.shaping, Default::default());
        for (body, err) in [
            (&br#"{"prompt": [1], "presence_penalty": 3}"#[..], "presence-penalty 3 must be in [-2, 2]"),
            (br#"{"prompt": [1], "logit_bias": {"a": 1}}"#, "logit_bias: \"a\" is not a token id"),
            (br#"{"prompt": "hello"}"#, "prompt: text needs a tokenizer"),
            (br#"{"prompt": [1], "stop": "x"}"#, "stop: text needs a tokenizer"),
            (br#"{"prompt": [1], "n": 0}"#, "n: 0 is not a positive count"),
            (
                br#"{"prompt": [1], "stream_options": {"include_usage": true}}"#,
                "stream_options: only with \"stream\": true",
            ),
            (br#"{"prompt": [1], "stream": true, "stream_options": {"x": 1}}"#, "stream_options: unknown field 'x'"),
            (br#"{"prompt": [1], "stream": true, "stream_options": {"include_usage": 1}}"#, "include_usage: 1 is not"),
            (br#"{"prompt": [[1], [2]], "n": 65}"#, "2 prompts x n 65: at most 128 choices a request"),
            (br#"{"prompt": [1], "echo": 1}"#, "echo: 1 is not true or false"),
            (br#"{"prompt": [1], "best_of": 2}"#, "unknown field 'best_of'"),
            (br#"{"max_tokens": 2}"#, "no \"prompt\""),
            (br#"{"prompt": [1], "stream": 1}"#, "stream: 1 is not true or false"),
            (br#"{"prompt": [1], "logprobs": "x"}"#, "logprobs: \"x\" is not"),
            (br#"{"prompt": [1], "logprobs": 50}"#, "top_logprobs: 50 (at most 20)"),
            (b"[1]", "not a JSON object"),
        ] {
            let got = completion_request(body, &defaults(), None).unwrap_err();
            assert!(got.contains(err), "{}: {got}", String::from_utf8_lossy(body));
        }
    }

    /// Several prompts and `n` choices each: a request a choice, prompt by prompt, each choice of a
    /// prompt seeded with the given seed plus its number.
    #[test]
    fn several_prompts_and_choices_are_a_request_each() {
        let body = br#"{"prompt": [[4, 5], [6]], "n": 3, "seed": 10, "temperature": 0.7, "max_tokens": 2}"#;
        let a = completion_request(body, &defaults(), None).unwrap();
        assert_eq!((a.n, a.stream, a.requests.len()), (3, false, 6));
        let prompts: Vec<&[u32]> = a.requests.iter().map(|r| r.prompt.as_slice()).collect();
        assert_eq!(prompts, [&[4, 5][..], &[4, 5], &[4, 5], &[6], &[6], &[6]]);
        for (k, r) in a.requests.iter().enumerate() {
            let seeded = v3c_models::reference::Sampler::new(0.7, 1.0, 10 + (k % 3) as u64);
            assert_eq!((format!("{:?}", r.sampler), r.max_new), (format!("{seeded:?}"), 2), "choice {k}");
        }
    }

    /// With a tokenizer, a text prompt (alone or in a batch of one) is encoded with its template's
    /// special tokens, and string stops are stop strings; token id stops stay ids.
    #[test]
    fn text_prompts_and_string_stops_need_and_use_a_tokenizer() {
        let t = crate::tokenizer::fixture::shared();
        let want = t.encode("Hello world!", true);
        for body in [
            &br#"{"prompt": "Hello world!", "stop": "\n"}"#[..],
            br#"{"prompt": ["Hello world!"], "stop": ["\n", "END"]}"#,
        ] {
            let (r, _) = one(completion_request(body, &defaults(), Some(&t)).unwrap());
            assert_eq!(r.prompt, want);
            assert_eq!(r.stop_text.unwrap().strings[0], "\n");
            assert!(r.stop.is_empty());
        }
        let (r, _) = one(completion_request(br#"{"prompt": "x", "stop": [[5, 6]]}"#, &defaults(), Some(&t)).unwrap());
        assert_eq!((r.stop, r.stop_text.is_none()), (vec![vec![5, 6]], true));
        let e = completion_request(br#"{"prompt": "x", "stop": [""]}"#, &defaults(), Some(&t)).unwrap_err();
        assert_eq!(e, "stop: an empty string");
    }

    /// A chat request's messages go through the chat template; its own fields map as OpenAI's
    /// chat API names them; without a chat template it is refused.
    #[test]
    fn chat_bodies_become_requests_through_the_chat_template() {
        let t = crate::tokenizer::fixture::shared();
        let messages =
            serde_json::json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
        let body = serde_json::json!({"model": "m", "messages": messages, "max_completion_tokens": 5, "max_tokens": 9,
            "logprobs": true, "top_logprobs": 2, "stop": ["\n"], "stream": true, "store": false,
            "metadata": {"run": "1"}, "prompt_cache_key": "k"});
        let (r, stream) = one(chat_request(body.to_string().as_bytes(), &defaults(), Some(&t)).unwrap());
        assert_eq!(r.prompt, t.chat(&messages, true).unwrap());
        assert_eq!((r.max_new, r.logprobs, r.top_logprobs, stream), (5, true, 2, true));
        assert_eq!(r.stop_text.unwrap().strings, ["\n"]);
        let plain = Arc::new(Tokenizer::from_json(&crate::tokenizer::fixture::json().to_string(), None).unwrap());
        for (body, tokenizer, err) in [
            (r#"{"messages": [{"role": "user", "content": "x"}]}"#, None, "messages: chat needs a tokenizer"),
            (r#"{"messages": [{"role": "user", "content": "x"}]}"#, Some(&plain), "with a chat template"),
            (r#"{"messages": []}"#, Some(&t), "messages: an empty conversation"),
            (r#"{"prompt": "x"}"#, Some(&t), "unknown field 'prompt'"),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": 3}"#,
                Some(&t),
                "logprobs: 3 is not true or false",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}"#,
                Some(&t),
                "top_logprobs: only with",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}"#,
                Some(&t),
                "max_tokens: -1 is not a whole number",
            ),
            (r#"{"messages": [{"role": "robot", "content": "x"}]}"#, Some(&t), "unknown role: robot"),
        ] {
            let got = chat_request(body.as_bytes(), &defaults(), tokenizer).unwrap_err();
            assert!(got.contains(err), "{body}: {got}");
        }
    }

    /// A JSON value of any shape, nested a few deep, its strings and keys from the words the
    /// APIs use (so that mutated bodies reach past the first check).
    fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        const WORDS: [&str; 24] = [
            "role",
            "user",
            "assistant",
            "system",
            "tool",
            "content",
            "text",
            "type",
            "function",
            "name",
            "arguments",
            "input",
            "tool_use",
            "tool_result",
            "tool_use_id",
            "call_id",
            "function_call",
            "function_call_output",
            "messages",
            "format",
            "json_schema",
            "schema",
            "id",
            "output",
        ];
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            (-5i64..300).prop_map(serde_json::Value::from),
            (0..WORDS.len()).prop_map(|k| serde_json::Value::from(WORDS[k])),
            "[ -~]{0,6}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
                proptest::collection::vec(((0..WORDS.len()).prop_map(|k| WORDS[k].to_string()), inner), 0..5)
                    .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// `value` with the node at `path` (each step an index into the arrays and objects on the
    /// way, modulo their sizes) replaced by `by`.
    fn replaced(value: serde_json::Value, path: &[usize], by: serde_json::Value) -> serde_json::Value {
        let Some((&step, rest)) = path.split_first() else { return by };
        match value {
            serde_json::Value::Array(mut a) if !a.is_empty() => {
                let k = step % a.len();
                a[k] = replaced(a[k].take(), rest, by);
                serde_json::Value::Array(a)
            }
            serde_json::Value::Object(mut o) if !o.is_empty() => {
                let n = o.len();
                if let Some(v) = o.values_mut().nth(step % n) {
                    *v = replaced(v.take(), rest, by);
                }
                serde_json::Value::Object(o)
            }
            _ => by,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        /// Bodies of any shape — and valid ones with any part replaced by any value — are
        /// answered or refused by the Responses and Messages translations and the chat reader
        /// through the chat template, never with a panic.
        #[test]
        fn any_body_is_answered_or_refused(
            by in any_json(),
            path in proptest::collection::vec(0usize..8, 0..6),
            which in 0usize..3,
        ) {
            let t = crate::tokenizer::fixture::shared();
            let valid = [
                serde_json::json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]},
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c", "output": "y"}],
                    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}],
                    "text": {"format": {"type": "text"}}, "max_output_tokens": 4}),
                serde_json::json!({"max_tokens": 4, "system": "s", "messages": [{"role": "user", "content": "x"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c", "content": "y"}]}],
                    "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}}}],
                    "tool_choice": {"type": "any"}}),
                serde_json::json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
            ];
            let d = RequestDefaults { eos: t.token_id("<｜end▁of▁sentence｜>"), ..defaults() };
            let read = |body: &serde_json::Value| {
                let bytes = body.to_string();
                let chat = match which {
                    0 => crate::responses::chat_body(bytes.as_bytes(), &Default::default()).map(|t| t.chat.to_string()),
                    1 => crate::messages::chat_body(bytes.as_bytes()).map(|(c, _)| c.to_string()),
                    _ => Ok(bytes),
                };
                chat.and_then(|chat| chat_request(chat.as_bytes(), &d, Some(&t)).map(|_| ()))
            };
            // The valid body is read whole; its changes and any value, without a panic.
            proptest::prop_assert_eq!(read(&valid[which]), Ok(()));
            let _ = read(&by);
            let _ = read(&replaced(valid[which].clone(), &path, by));
        }
    }
}
