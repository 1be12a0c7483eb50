//! `v3r serve --http ADDR`: the serving loop ([`crate::session::serve`]) behind a small HTTP/1.1
//! server speaking OpenAI's API:
//! - `POST /v1/completions`: `{"prompt": "text" or [ids] (or an array of prompts), "n": choices,
//!   "max_tokens": N, "temperature": T, "top_p": P, "seed": S, "stop": ["text", ...] or [[ids], ...],
//!   "logprobs": true or K, "echo": true, "stream": true}`;
//! - `POST /v1/chat/completions`: `{"messages": [...], ...}`, written by the tokenizer's chat template;
//!   with `"tools": [...]`, the functions the model may call ([`crate::tools`]), its calls in the
//!   message's `tool_calls`;
//! - `POST /v1/responses`: OpenAI's Responses API over the chat path ([`crate::responses`]):
//!   `input` items in, output items (reasoning, message, function calls) out, or its events;
//! - `POST /v1/messages`: Anthropic's Messages API over the chat path ([`crate::messages`]):
//!   content blocks in and out (thinking, text, tool_use), or Anthropic's events;
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus).
//!
//! Text needs a tokenizer ([`crate::tokenizer`]); replies carry the tokens in `tokens` and, with a
//! tokenizer, their text (special tokens left out, cut before a stop string) in `text` or the
//! assistant's `message` (else it is empty). Each connection has a thread of its own that parses
//! its requests, hands them to the serving loop (one queue for all: each choice a request) and
//! writes what the loop reports: the whole reply, or with `stream` a server-sent event per token
//! then `data: [DONE]`. A client that goes away while its tokens stream cancels its request.
//! Connections stay open across requests (HTTP/1.1's keep-alive) until the client closes one, a
//! stream ends, or it idles 60 s.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;

use std::sync::Arc;

use crate::cli::RequestDefaults;
use crate::route::{RouteEnd, Routed, Router, Scored};
use crate::session::{generation_text, Arrival, Ending, Generation, Progress, Request};
use crate::tokenizer::Tokenizer;

/// The largest request body read (a prompt of a million token ids fits).
const MAX_BODY: usize = 16 << 20;

/// A parsed HTTP request: its method, path and body.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// Its `Authorization` header (or `x-api-key`'s key, as `Bearer KEY`).
    pub authorization: Option<String>,
    /// The connection stays open after the reply (HTTP/1.1 unless `Connection: close`; HTTP/1.0
    /// with `Connection: keep-alive`).
    pub keep_alive: bool,
}

/// Reads one HTTP/1.1 request (request line, headers, a `Content-Length` body) from `reader`;
/// None where the client closed the connection, or let it idle past its read timeout, before
/// sending one (a kept-alive connection's end).
pub fn read_request(reader: &mut impl BufRead) -> Result<Option<HttpRequest>, String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e)
            if line.is_empty() && matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("reading the request: {e}")),
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("not an HTTP request line: {:?}", line.trim_end()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("{version}: only HTTP/1.x is served"));
    }
    let (method, path) = (method.to_string(), path.split('?').next().unwrap_or(path).to_string());
    let (mut length, mut authorization) = (0usize, None);
    let mut keep_alive = version == "HTTP/1.1";
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).map_err(|e| format!("reading the headers: {e}"))? == 0 {
            return Err("the headers end before a blank line".into());
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| format!("Content-Length: {:?}", value.trim()))?;
            } else if name.trim().eq_ignore_ascii_case("connection") {
                match value.trim().to_ascii_lowercase().as_str() {
                    "close" => keep_alive = false,
                    "keep-alive" => keep_alive = true,
                    _ => {}
                }
            } else if name.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_string());
            } else if name.trim().eq_ignore_ascii_case("x-api-key") && authorization.is_none() {
                // Anthropic's clients' key.
                authorization = Some(format!("Bearer {}", value.trim()));
            } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Err("chunked request bodies are not read: send a Content-Length".into());
            }
        }
    }
    if length > MAX_BODY {
        return Err(format!("a body of {length} bytes (at most {MAX_BODY})"));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).map_err(|e| format!("reading a body of {length} bytes: {e}"))?;
    Ok(Some(HttpRequest { method, path, body, authorization, keep_alive }))
}

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

fn api_request(
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
fn finish_reason(g: &Generation) -> &'static str {
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
fn chat_token(tokenizer: &Tokenizer, t: u32, lp: f32, alts: &[(u32, f32)]) -> serde_json::Value {
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

/// Writes a whole response: `status` (e.g. "200 OK") and a JSON body.
fn respond(conn: &mut Conn, status: &str, body: &serde_json::Value) -> std::io::Result<()> {
    respond_text(conn, status, "application/json", &body.to_string())
}

/// Writes a whole response of `content_type`, the connection kept open or closed as `conn` says.
fn respond_text(conn: &mut Conn, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let connection = if conn.keep { "keep-alive" } else { "close" };
    write!(
        conn.stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        body.len()
    )?;
    conn.stream.flush()
}

/// An error response in OpenAI's shape.
fn respond_error(conn: &mut Conn, status: &str, message: &str) -> std::io::Result<()> {
    let kind = if status.starts_with('4') { "invalid_request_error" } else { "server_error" };
    respond(conn, status, &serde_json::json!({ "error": { "message": message, "type": kind } }))
}

/// A client's connection, and whether it stays open after the reply being written.
struct Conn {
    stream: TcpStream,
    keep: bool,
}

/// What a connection's thread hands the serving loop.
enum Message {
    /// A request, and where its progress goes.
    Request(Box<Request>, mpsc::Sender<Progress>),
    /// The client of request `.0` (its number in arrival order) went away.
    Gone(usize),
}

/// Figures of a served run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Served {
    pub requests: usize,
    pub tokens: usize,
    pub joined: usize,
    pub prefill_s: f64,
}

/// What every connection of a server answers with: what requests leave out, the tokenizer
/// (text and chat), the model's name in the replies, and the API key requests must carry.
pub struct Site {
    pub defaults: RequestDefaults,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub model: String,
    /// `Authorization: Bearer KEY` on every request but `GET /health` (None: none needed).
    pub api_key: Option<String>,
    /// The most tokens a sequence holds (prompt and new), said by `GET /v1/models`.
    pub max_len: usize,
    /// What `GET /metrics` says; kept by [`serve_http`].
    pub metrics: std::sync::Mutex<Metrics>,
}

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A Prometheus histogram: observations per bucket (not cumulative), their sum and count.
#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, x: f64) {
        if let Some(b) = BUCKETS.iter().position(|&le| x <= le) {
            self.counts[b] += 1;
        }
        self.sum += x;
        self.count += 1;
    }

    /// Its lines in Prometheus' text format (cumulative buckets, then +Inf, sum, count).
    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        let mut below = 0;
        for (le, n) in BUCKETS.iter().zip(self.counts) {
            below += n;
            out.push_str(&format!("{name}_bucket{{le=\"{le}\"}} {below}\n"));
        }
        out.push_str(&format!(
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n",
            self.count, self.sum, self.count
        ));
    }
}

/// A server's counters, gauges and histograms, as Prometheus scrapes them (`GET /metrics`).
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Requests ended, by how: stop, length, cancelled, refused.
    finished: [u64; 4],
    /// Requests arrived and not yet ended (waiting or running).
    in_flight: u64,
    prompt_tokens: u64,
    cached_prompt_tokens: u64,
    generation_tokens: u64,
    time_to_first_token: Histogram,
    latency: Histogram,
    /// The batch's load after its latest step.
    load: crate::session::Load,
}

impl Metrics {
    const HOW: [&'static str; 4] = ["stop", "length", "cancelled", "refused"];

    fn arrived(&mut self, prompt_tokens: usize) {
        self.in_flight += 1;
        self.prompt_tokens += prompt_tokens as u64;
    }

    /// A request ended (`how`: an index of [`Metrics::HOW`]) after `seconds`, with generation `g`
    /// (a refused one has none).
    fn ended(&mut self, how: usize, seconds: f64, g: Option<&Generation>) {
        self.finished[how] += 1;
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(g) = g {
            self.generation_tokens += g.tokens.len() as u64;
            self.cached_prompt_tokens += g.reused as u64;
            self.latency.observe(seconds);
        }
    }

    /// Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP v3r_requests_total Requests ended, by how.\n# TYPE v3r_requests_total counter\n");
        for (how, n) in Metrics::HOW.iter().zip(self.finished) {
            out.push_str(&format!("v3r_requests_total{{finish=\"{how}\"}} {n}\n"));
        }
        for (name, kind, help, value) in [
            ("v3r_requests_in_flight", "gauge", "Requests waiting or running.", self.in_flight),
            ("v3r_prompt_tokens_total", "counter", "Prompt tokens of the requests arrived.", self.prompt_tokens),
            (
                "v3r_cached_prompt_tokens_total",
                "counter",
                "Prompt tokens whose cache rows were shared, not prefilled.",
                self.cached_prompt_tokens,
            ),
            ("v3r_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
            ("v3r_requests_running", "gauge", "Requests in the batch (joining or decoding).", self.load.running as u64),
            ("v3r_requests_waiting", "gauge", "Requests waiting to join the batch.", self.load.waiting as u64),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        }
        let usage = "Share of the cache pages sequences may take that are held (of the slots, without a pool).";
        out.push_str(&format!(
            "# HELP v3r_kv_cache_usage_ratio {usage}\n# TYPE v3r_kv_cache_usage_ratio gauge\nv3r_kv_cache_usage_ratio {}\n",
            self.load.cache_usage
        ));
        let ttft = "Seconds from a request's arrival to its first token.";
        self.time_to_first_token.render("v3r_time_to_first_token_seconds", ttft, &mut out);
        self.latency.render("v3r_request_latency_seconds", "Seconds from a request's arrival to its end.", &mut out);
        out
    }
}

/// Serves completions on `listener` until `stop` returns true between requests (checked every
/// 100 ms while idle; a server runs until killed otherwise): each connection's request is served
/// by [`crate::session::serve`] as `o` says, answered as `site` says.
pub fn serve_http(
    listener: TcpListener,
    program: &dyn crate::session::Program,
    o: &crate::session::Serving,
    site: Site,
    stop: &dyn Fn() -> bool,
) -> Result<Served, String> {
    let (tx, rx) = mpsc::channel::<(Message, Option<mpsc::Sender<usize>>)>();
    listener.set_nonblocking(false).map_err(|e| e.to_string())?;
    let accepting = tx.clone();
    let site = Arc::new(site);
    let serving = site.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (tx, site) = (accepting.clone(), site.clone());
            std::thread::spawn(move || connection(stream, tx, &site));
        }
    });
    let metrics = |f: &mut dyn FnMut(&mut Metrics)| {
        if let Ok(mut m) = serving.metrics.lock() {
            f(&mut m);
        }
    };
    // Per request (in arrival order): when it arrived, whether its first token and its end came.
    let seen: std::cell::RefCell<Vec<(std::time::Instant, bool, bool)>> = Default::default();
    drop(tx);
    // Per request (in arrival order): where its progress goes.
    let replies: std::cell::RefCell<Vec<Option<mpsc::Sender<Progress>>>> = Default::default();
    let mut served = Served::default();
    let mut stopping = false;
    let mut next = |idle: bool| {
        if !stopping && stop() {
            stopping = true;
            eprintln!("stopping: no new requests; those running end first (signal again to end at once)");
        }
        if stopping {
            // Draining: cancels still taken, new requests refused (503).
            loop {
                match rx.try_recv() {
                    Ok((Message::Request(_, reply), number)) => {
                        let mut replies = replies.borrow_mut();
                        if let Some(number) = number {
                            let _ = number.send(replies.len());
                        }
                        let _ = reply.send(Progress::Refused(STOPPING.into()));
                        replies.push(None);
                        seen.borrow_mut().push((std::time::Instant::now(), false, true));
                    }
                    Ok((Message::Gone(i), _)) => return Arrival::Cancel(i),
                    Err(mpsc::TryRecvError::Empty) if !idle => return Arrival::NotYet,
                    Err(_) => return Arrival::Closed,
                }
            }
        }
        let message = match idle {
            true => loop {
                match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                    Ok(m) => break m,
                    Err(mpsc::RecvTimeoutError::Timeout) if stop() => return Arrival::Closed,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Arrival::Closed,
                }
            },
            false => match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::TryRecvError::Empty) => return Arrival::NotYet,
                Err(mpsc::TryRecvError::Disconnected) => return Arrival::Closed,
            },
        };
        match message {
            (Message::Request(r, reply), number) => {
                let mut replies = replies.borrow_mut();
                if let Some(number) = number {
                    let _ = number.send(replies.len());
                }
                replies.push(Some(reply));
                seen.borrow_mut().push((std::time::Instant::now(), false, false));
                metrics(&mut |m| m.arrived(r.prompt.len()));
                Arrival::Request(*r)
            }
            (Message::Gone(i), _) => Arrival::Cancel(i),
        }
    };
    let mut report = |i: usize, p: Progress| -> Result<(), String> {
        if let Progress::Ended(g) = &p {
            served.requests += 1;
            served.tokens += g.tokens.len();
        }
        if let Some((arrived, first, done)) = seen.borrow_mut().get_mut(i).filter(|s| !s.2) {
            let seconds = arrived.elapsed().as_secs_f64();
            match &p {
                Progress::Token(_) if !*first => {
                    *first = true;
                    metrics(&mut |m| m.time_to_first_token.observe(seconds));
                }
                Progress::Ended(g) => {
                    let how = if finish_reason(g) == "stop" { 0 } else { 1 };
                    metrics(&mut |m| m.ended(how, seconds, Some(g)));
                }
                Progress::Cancelled(g) => metrics(&mut |m| m.ended(2, seconds, Some(g))),
                Progress::Refused(_) => metrics(&mut |m| m.ended(3, seconds, None)),
                _ => {}
            }
            *done = matches!(p, Progress::Ended(_) | Progress::Cancelled(_) | Progress::Refused(_));
        }
        let last = matches!(p, Progress::Ended(_) | Progress::Cancelled(_) | Progress::Refused(_));
        let mut replies = replies.borrow_mut();
        if let Some(reply) = replies.get(i).and_then(Option::as_ref) {
            // A client gone already: nothing to tell it.
            let _ = reply.send(p);
        }
        if last {
            if let Some(r) = replies.get_mut(i) {
                *r = None;
            }
        }
        Ok(())
    };
    let load = |l: crate::session::Load| metrics(&mut |m| m.load = l);
    let o = crate::session::Serving { load: Some(&load), ..*o };
    let (joined, prefill_s) = crate::session::serve(program, &o, &mut next, &mut report)?;
    // No more taken: a request now is refused at once (503).
    drop(rx);
    // Stopped: the replies of the requests that ended written before the process ends (at most
    // 30 s more).
    let waited = std::time::Instant::now();
    while ANSWERING.load(std::sync::atomic::Ordering::SeqCst) > 0 && waited.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(Served { joined, prefill_s, ..served })
}

/// Requests being answered (read, and their replies not yet all written).
static ANSWERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Why a request that came while the server stops is refused (503).
const STOPPING: &str = "the server is stopping";

/// Seconds since the Unix epoch (`created`).
fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One connection: its requests read, routed, answered, one after another while the client
/// keeps it open (a streamed reply closes it).
fn connection(stream: TcpStream, tx: mpsc::Sender<(Message, Option<mpsc::Sender<usize>>)>, site: &Site) {
    // A client that never finishes a request, or idles, does not hold its thread for ever.
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(60)));
    let Ok(reading) = stream.try_clone() else { return };
    let mut reader = BufReader::new(reading);
    let mut conn = Conn { stream, keep: false };
    loop {
        let request = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                conn.keep = false;
                let _ = respond_error(&mut conn, "400 Bad Request", &e);
                return;
            }
        };
        conn.keep = request.keep_alive;
        ANSWERING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        answer(&mut conn, &request, &tx, site);
        ANSWERING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if !conn.keep {
            return;
        }
    }
}

/// One request of a connection, answered.
fn answer(
    conn: &mut Conn,
    request: &HttpRequest,
    tx: &mpsc::Sender<(Message, Option<mpsc::Sender<usize>>)>,
    site: &Site,
) {
    let model = site.model.as_str();
    let authorized = match &site.api_key {
        None => true,
        Some(key) => request.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).is_some_and(|given| {
            // Compared in time independent of where they differ.
            given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
        }),
    };
    if !authorized && request.path != "/health" && request.path != "/metrics" {
        let message = "a valid API key is needed: Authorization: Bearer KEY (v3r serve --api-key)";
        let body = serde_json::json!({ "error": { "message": message, "type": "invalid_request_error", "code": "invalid_api_key" } });
        let _ = respond(conn, "401 Unauthorized", &body);
        return;
    }
    match (request.method.as_str(), request.path.as_str()) {
        // Stopping: not healthy, so that a balancer sends no more.
        ("GET", "/health") if crate::interrupt::happened() => {
            let _ = respond(conn, "503 Service Unavailable", &serde_json::json!({ "status": "stopping" }));
        }
        ("GET", "/health") => {
            let _ = respond(conn, "200 OK", &serde_json::json!({ "status": "ok" }));
        }
        ("GET", "/metrics") => {
            let body = site.metrics.lock().map(|m| m.render()).unwrap_or_default();
            let _ = respond_text(conn, "200 OK", "text/plain; version=0.0.4", &body);
        }
        ("GET", "/v1/models") => {
            let models = serde_json::json!({ "object": "list", "data": [model_object(site)] });
            let _ = respond(conn, "200 OK", &models);
        }
        // One model: this one, by its name.
        ("GET", path) if path.strip_prefix("/v1/models/") == Some(model) => {
            let _ = respond(conn, "200 OK", &model_object(site));
        }
        ("GET", path) if path.starts_with("/v1/models/") => {
            let name = path.trim_start_matches("/v1/models/");
            let _ = respond_error(conn, "404 Not Found", &format!("model {name}: served here is {model}"));
        }
        ("POST", "/v1/completions") => completion(Api::Completions, conn, &request.body, tx, site),
        ("POST", "/v1/chat/completions") => completion(Api::Chat, conn, &request.body, tx, site),
        ("POST", "/v1/responses") => responses(conn, &request.body, tx, site),
        ("POST", "/v1/messages") => messages(conn, &request.body, tx, site),
        ("POST", "/v1/messages/count_tokens") => {
            // The prompt the chat template writes of it (tools included), counted.
            let _ = match one_chat(crate::messages::count_body(&request.body).map(|c| (c, false)), site) {
                Ok((r, _, _)) => respond(conn, "200 OK", &serde_json::json!({ "input_tokens": r.prompt.len() })),
                Err(e) => respond(conn, "400 Bad Request", &crate::messages::error("invalid_request_error", &e)),
            };
        }
        ("POST", path @ ("/tokenize" | "/detokenize")) => {
            let _ = match tokenize(path == "/tokenize", &request.body, site) {
                Ok(body) => respond(conn, "200 OK", &body),
                Err(e) => respond_error(conn, "400 Bad Request", &e),
            };
        }
        (
            _,
            "/health"
            | "/metrics"
            | "/v1/models"
            | "/v1/completions"
            | "/v1/chat/completions"
            | "/v1/responses"
            | "/v1/messages"
            | "/v1/messages/count_tokens"
            | "/tokenize"
            | "/detokenize",
        ) => {
            let _ = respond_error(conn, "405 Method Not Allowed", &format!("{} {}", request.method, request.path));
        }
        (_, path) => {
            let message = format!(
                "{path}: served are POST /v1/completions, POST /v1/chat/completions, POST /v1/responses, POST \
                 /v1/messages (and /v1/messages/count_tokens), POST /tokenize, POST /detokenize, GET /v1/models, GET \
                 /health and GET /metrics"
            );
            let _ = respond_error(conn, "404 Not Found", &message);
        }
    }
}

/// The served model, as `GET /v1/models` lists it.
fn model_object(site: &Site) -> serde_json::Value {
    serde_json::json!({ "id": site.model, "object": "model", "created": 0, "owned_by": "v3c",
        "max_model_len": site.max_len })
}

/// vLLM's `POST /tokenize` (`{"prompt": "text"}` or `{"messages": [...]}` through the chat
/// template with the assistant's turn opened, `add_special_tokens` true by default: `{"tokens",
/// "count", "max_model_len"}`) and `POST /detokenize` (`{"tokens": [ids]}`: `{"prompt": text}`).
fn tokenize(encode: bool, body: &[u8], site: &Site) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not a JSON body: {e}"))?;
    let o = v.as_object().ok_or("the body is not a JSON object")?;
    let fields: &[&str] =
        if encode { &["prompt", "messages", "add_special_tokens", "model"] } else { &["tokens", "model"] };
    if let Some(k) = o.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(format!("unknown field '{k}' ({})", fields.join(", ")));
    }
    let t =
        site.tokenizer.as_ref().ok_or("no tokenizer (v3r serve --tokenizer FILE, or tokenizer.json in --weights)")?;
    if !encode {
        let ids =
            o.get("tokens").and_then(serde_json::Value::as_array).ok_or("no \"tokens\" (an array of token ids)")?;
        let ids = ids
            .iter()
            .map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok()).filter(|&i| (i as usize) < t.vocab_size()))
            .map(|i| i.ok_or_else(|| format!("tokens: not token ids of a vocabulary of {}", t.vocab_size())))
            .collect::<Result<Vec<u32>, String>>()?;
        return Ok(serde_json::json!({ "prompt": t.decode(&ids, false) }));
    }
    let special = match o.get("add_special_tokens") {
        None | Some(serde_json::Value::Null) => true,
        Some(x) => x.as_bool().ok_or_else(|| format!("add_special_tokens: {x} is not true or false"))?,
    };
    let tokens = match (o.get("prompt"), o.get("messages")) {
        (Some(serde_json::Value::String(text)), None) => t.encode(text, special),
        (None, Some(messages)) if t.has_chat_template() => t.chat(messages, true)?,
        (None, Some(_)) => return Err("messages: the tokenizer has no chat template".into()),
        (Some(_), Some(_)) => return Err("\"prompt\" and \"messages\": one of them".into()),
        (Some(x), None) => return Err(format!("prompt: {x} is not a string")),
        (None, None) => return Err("no \"prompt\" (text) or \"messages\"".into()),
    };
    Ok(serde_json::json!({ "tokens": tokens, "count": tokens.len(), "max_model_len": site.max_len }))
}

/// What a connection knows of one of its requests: its prompt, whether it is echoed, its stop
/// strings, and where its progress comes.
struct Pending {
    number: usize,
    prompt: Vec<u32>,
    echoed: bool,
    stops: Option<crate::session::TextStops>,
    events: mpsc::Receiver<Progress>,
    /// The functions it may call (read for calls when it ends).
    tools: Option<Arc<crate::tools::Tools>>,
    /// How its completion parts into reasoning and answer.
    reasoning: Option<crate::reasoning::Reasoning>,
}

/// A chat reply's parts, whole: its reasoning (tokens and text; None: it did not reason, or is
/// not read for reasoning), its answer's tokens, its text (cut before a stop string; where it
/// called, the text before the calls) and its calls.
struct Whole {
    reasoning: Option<Vec<u32>>,
    thought: Option<String>,
    answer: Vec<u32>,
    text: String,
    called: Option<Called>,
}

impl Pending {
    /// Its reply `g`'s parts, through `t`.
    fn whole(&self, g: &Generation, t: &Tokenizer) -> Whole {
        let (reasoning, answer) = self.split(g);
        let called = called(self.tools.as_deref(), t, self.number, &answer);
        let text = match &called {
            Some(c) => c.content.clone(),
            None => generation_text(t, &answer, self.stops.as_ref()),
        };
        let thought = reasoning.as_ref().map(|r| t.decode(r, true));
        Whole { reasoning, thought, answer, text, called }
    }

    /// Its completion's reasoning tokens (None: it did not reason, or is not read for reasoning)
    /// and answer tokens.
    fn split(&self, g: &Generation) -> (Option<Vec<u32>>, Vec<u32>) {
        match self.reasoning {
            Some(r) => r.split(&g.tokens),
            None => (None, g.tokens.clone()),
        }
    }
}

/// Queues `request` into the batch (`api`'s: echoed only by completions): what the connection
/// keeps of it (None: the server is stopping).
fn queue(api: Api, request: Request, tx: &mpsc::Sender<(Message, Option<mpsc::Sender<usize>>)>) -> Option<Pending> {
    let (prompt, echoed) = (request.prompt.clone(), request.echo && api == Api::Completions);
    let (stops, tools, reasoning) = (request.stop_text.clone(), request.tools.clone(), request.reasoning);
    let (progress, events) = mpsc::channel();
    let (number_tx, number_rx) = mpsc::channel();
    tx.send((Message::Request(Box::new(request), progress), Some(number_tx))).ok()?;
    let number = number_rx.recv().ok()?;
    Some(Pending { number, prompt, echoed, stops, events, tools, reasoning })
}

/// `p`'s end: its generation, or the status and message of why there is none.
fn wait(p: &Pending) -> Result<Generation, (&'static str, String)> {
    let outcome = p.events.iter().find_map(|event| match event {
        Progress::Token(_) | Progress::Scored(..) => None,
        Progress::Ended(g) | Progress::Cancelled(g) => Some(Ok(g)),
        Progress::Refused(e) if e == STOPPING => Some(Err(("503 Service Unavailable", e))),
        Progress::Refused(e) => Some(Err(("400 Bad Request", e))),
    });
    outcome.unwrap_or_else(|| Err(("503 Service Unavailable", "the server stopped before the request ended".into())))
}

/// A completion: parsed, queued (each choice a request of its own), answered whole or streamed.
fn completion(
    api: Api,
    conn: &mut Conn,
    body: &[u8],
    tx: &mpsc::Sender<(Message, Option<mpsc::Sender<usize>>)>,
    site: &Site,
) {
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

/// Another API's request as a chat completion's body (`chat`: it, and whether the reply
/// streams): the one request it makes, whether it streams, and the tokenizer a chat needs.
fn one_chat(
    chat: Result<(serde_json::Value, bool), String>,
    site: &Site,
) -> Result<(Request, bool, &Arc<Tokenizer>), String> {
    let (chat, stream) = chat?;
    let tokenizer = site.tokenizer.as_ref();
    let mut r = api_request(Api::Chat, chat.to_string().as_bytes(), &site.defaults, tokenizer)?;
    // A chat needs a tokenizer (refused above without one); `n` is not these APIs'.
    match (r.requests.len(), tokenizer) {
        (1, Some(t)) => Ok((r.requests.remove(0), stream, t)),
        _ => Err("one reply a request".into()),
    }
}

/// OpenAI's Responses API ([`crate::responses`]): the request as a chat completion's (one
/// choice), answered as a response object, or streamed as the API's events.
fn responses(conn: &mut Conn, body: &[u8], tx: &mpsc::Sender<(Message, Option<mpsc::Sender<usize>>)>, site: &Site) {
    use crate::responses::{items, response, usage, Outcome};
    let model = site.model.as_str();
    let (request, stream, t) = match one_chat(crate::responses::chat_body(body), site) {
        Ok(r) => r,
        Err(e) => {
            let _ = respond_error(conn, "400 Bad Request", &e);
            return;
        }
    };
    // The request's settings, echoed in the response.
    let given: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let Some(p) = queue(Api::Chat, request, tx) else {
        let _ = respond_error(conn, "503 Service Unavailable", "the server is stopping");
        return;
    };
    let created = now();
    if stream {
        stream_response(conn, &p, tx, site, t, &given, created);
        return;
    }
    let g = match wait(&p) {
        Ok(g) => g,
        Err((status, e)) => {
            let _ = respond_error(conn, status, &e);
            return;
        }
    };
    let Whole { reasoning, thought, text, called, .. } = p.whole(&g, t);
    let outcome = Outcome { number: p.number, reasoning: thought.as_deref(), text: &text, called: called.as_ref() };
    let mut output = items(&outcome);
    if !g.logprobs.is_empty() {
        // Every token's, on the message.
        let logprobs: Vec<serde_json::Value> = (g.tokens.iter().zip(&g.logprobs).enumerate())
            .map(|(k, (&tok, &lp))| chat_token(t, tok, lp, g.top_logprobs.get(k).map_or(&[][..], Vec::as_slice)))
            .collect();
        if let Some(m) = output.iter_mut().find(|i| i["type"] == "message") {
            m["content"][0]["logprobs"] = logprobs.into();
        }
    }
    let status = if finish_reason(&g) == "length" { "incomplete" } else { "completed" };
    let used = usage(p.prompt.len(), g.reused, g.tokens.len(), reasoning.map_or(0, |r| r.len()));
    let _ = respond(conn, "200 OK", &response(p.number, created, model, &given, status, output, used));
}

/// A streamed response's events as it writes them: numbered, and its reasoning and message
/// items opened (given the next output index), added to and closed.
struct ResponseEvents<'a> {
    stream: &'a mut TcpStream,
    sequence: u64,
    /// The client is still there.
    ok: bool,
    number: usize,
    /// The next output item's index.
    next: usize,
    reasoning_at: Option<usize>,
    reasoning_done: bool,
    thought_text: String,
    message_at: Option<usize>,
    message_done: bool,
    message_text: String,
    /// The calls begun: each one's output index, id, name, arguments so far and whether it ended.
    calls: Vec<(usize, String, String, String, bool)>,
    /// The items done, by output index: the response's output.
    done: std::collections::BTreeMap<usize, serde_json::Value>,
}

impl ResponseEvents<'_> {
    /// Item `item` at `at` done.
    fn item_done(&mut self, at: usize, item: serde_json::Value) {
        self.send("response.output_item.done", serde_json::json!({ "output_index": at, "item": item }));
        self.done.insert(at, item);
    }

    /// One event: its type named in `event:` and in the data, numbered in order.
    fn send(&mut self, kind: &str, mut data: serde_json::Value) {
        data["type"] = kind.into();
        data["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        let text = format!("event: {kind}\ndata: {data}\n\n");
        self.ok = self.ok && self.stream.write_all(text.as_bytes()).and_then(|_| self.stream.flush()).is_ok();
    }

    /// An item added at the next index, with its (empty) content part: that index.
    fn open(&mut self, item: serde_json::Value, part: serde_json::Value) -> usize {
        let at = self.next;
        self.next += 1;
        let id = item["id"].clone();
        self.send("response.output_item.added", serde_json::json!({ "output_index": at, "item": item }));
        let added = serde_json::json!({ "item_id": id, "output_index": at, "content_index": 0, "part": part });
        self.send("response.content_part.added", added);
        at
    }

    fn reasoning(&mut self) -> usize {
        match self.reasoning_at {
            Some(at) => at,
            None => {
                let item = crate::responses::reasoning_item(self.number, "", "in_progress");
                let at = self.open(item, serde_json::json!({ "type": "reasoning_text", "text": "" }));
                *self.reasoning_at.insert(at)
            }
        }
    }

    fn message(&mut self) -> usize {
        match self.message_at {
            Some(at) => at,
            None => {
                let item = crate::responses::message_item(self.number, "", "in_progress");
                let part = serde_json::json!({ "type": "output_text", "text": "", "annotations": [], "logprobs": [] });
                let at = self.open(item, part);
                *self.message_at.insert(at)
            }
        }
    }

    /// The message's last text (`rest`) and its done events (once).
    fn close_message(&mut self, rest: &str) {
        if self.message_done {
            return;
        }
        self.say(rest, serde_json::json!([]));
        self.message_done = true;
        let (at, id, text) = (self.message(), format!("msg_{}", self.number), self.message_text.clone());
        let done =
            serde_json::json!({ "item_id": id, "output_index": at, "content_index": 0, "text": text, "logprobs": [] });
        self.send("response.output_text.done", done);
        let part = serde_json::json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] });
        self.send(
            "response.content_part.done",
            serde_json::json!({ "item_id": id, "output_index": at, "content_index": 0, "part": part }),
        );
        self.item_done(at, crate::responses::message_item(self.number, &text, "completed"));
    }

    /// Call `index`'s arguments and item done (`status`: `completed`, or `incomplete` where it
    /// was cut short).
    fn end_call(&mut self, index: usize, status: &str) {
        let Some((at, id, name, arguments, ended)) = self.calls.get_mut(index) else { return };
        if std::mem::replace(ended, true) {
            return;
        }
        let (at, item) = (*at, crate::responses::call_item(id, name, arguments, status));
        let done = serde_json::json!({ "item_id": item["id"], "output_index": at, "arguments": item["arguments"],
            "name": item["name"] });
        self.send("response.function_call_arguments.done", done);
        self.item_done(at, item);
    }
}

/// Where a streamed reply's text goes as it settles: its reasoning's, then its answer's.
trait Sink {
    /// Reasoning text (empty: the reasoning opened).
    fn think(&mut self, piece: &str);
    /// The reasoning's last text: it is over.
    fn close_reasoning(&mut self, rest: &str);
    /// Answer text, with its token's log-probabilities (OpenAI's shape; none: empty).
    fn say(&mut self, piece: &str, logprobs: serde_json::Value);
    /// A tool call as it is written (`id`: its id).
    fn call(&mut self, event: &crate::tools::CallEvent, id: &str);
    /// The request was refused, or the server stopped.
    fn error(&mut self, message: &str);
    /// The client is still there.
    fn ok(&self) -> bool;
}

impl Sink for ResponseEvents<'_> {
    fn think(&mut self, piece: &str) {
        let at = self.reasoning();
        if !piece.is_empty() {
            let id = format!("rs_{}", self.number);
            let delta = serde_json::json!({ "item_id": id, "output_index": at, "content_index": 0, "delta": piece });
            self.send("response.reasoning_text.delta", delta);
            self.thought_text.push_str(piece);
        }
    }

    /// The reasoning's last text (`rest`) and its done events (once).
    fn close_reasoning(&mut self, rest: &str) {
        self.think(rest);
        if std::mem::replace(&mut self.reasoning_done, true) {
            return;
        }
        let (at, id, text) = (self.reasoning(), format!("rs_{}", self.number), self.thought_text.clone());
        let done = serde_json::json!({ "item_id": id, "output_index": at, "content_index": 0, "text": text });
        self.send("response.reasoning_text.done", done);
        let part = serde_json::json!({ "type": "reasoning_text", "text": text });
        self.send(
            "response.content_part.done",
            serde_json::json!({ "item_id": id, "output_index": at, "content_index": 0, "part": part }),
        );
        self.item_done(at, crate::responses::reasoning_item(self.number, &text, "completed"));
    }

    fn say(&mut self, piece: &str, logprobs: serde_json::Value) {
        if piece.is_empty() {
            return;
        }
        let (at, id) = (self.message(), format!("msg_{}", self.number));
        let delta = serde_json::json!({ "item_id": id, "output_index": at, "content_index": 0, "delta": piece, "logprobs": logprobs });
        self.send("response.output_text.delta", delta);
        self.message_text.push_str(piece);
    }

    /// A call as it is written: its item added (the message, if any, done first), its
    /// arguments' deltas, and done.
    fn call(&mut self, event: &crate::tools::CallEvent, id: &str) {
        use crate::tools::CallEvent;
        match event {
            CallEvent::Start { name, .. } => {
                if self.message_at.is_some() {
                    self.close_message("");
                }
                let at = self.next;
                self.next += 1;
                let added = crate::responses::call_item(id, name, "", "in_progress");
                self.send("response.output_item.added", serde_json::json!({ "output_index": at, "item": added }));
                self.calls.push((at, id.to_string(), name.clone(), String::new(), false));
            }
            CallEvent::Arguments { index, text } => {
                let Some((at, id, _, arguments, _)) = self.calls.get_mut(*index) else { return };
                arguments.push_str(text);
                let delta = serde_json::json!({ "item_id": crate::responses::call_item_id(id), "output_index": *at, "delta": text });
                self.send("response.function_call_arguments.delta", delta);
            }
            CallEvent::End { index } => self.end_call(*index, "completed"),
        }
    }
    fn error(&mut self, message: &str) {
        self.send("error", serde_json::json!({ "code": null, "message": message, "param": null }));
    }
    fn ok(&self) -> bool {
        self.ok
    }
}

/// How a streamed reply ended: its generation, its reasoning's tokens (None: it did not reason),
/// its calls, and its answer's last text (none where it called).
struct Followed {
    g: Generation,
    reasoning: Option<Vec<u32>>,
    called: Option<Called>,
    rest: String,
}

/// The id of call `index` of request `number` (as [`crate::tools::calls_json`] names it).
fn call_id(number: usize, index: usize) -> String {
    format!("call_{number}_{index}")
}

/// A chat reply's tokens as they come, routed ([`Router`]) to `sink`; None where it did not end
/// (refused: said to the sink; the client gone: cancelled).
fn follow(
    p: &Pending,
    t: &Arc<Tokenizer>,
    sink: &mut impl Sink,
    tx: &mpsc::Sender<(Message, Option<mpsc::Sender<usize>>)>,
) -> Option<Followed> {
    let mut router = Router::new(Some(t), p.stops.as_ref(), p.reasoning, p.tools.as_deref());
    let mut scored: Scored = None;
    let mut end = None;
    for event in p.events.iter() {
        match event {
            Progress::Scored(lp, alts) => scored = Some((lp, alts)),
            Progress::Token(tok) => {
                for r in router.token(tok, scored.take()) {
                    match r {
                        Routed::Think { text, .. } => sink.think(&text),
                        Routed::ThinkEnd(rest) => sink.close_reasoning(&rest),
                        Routed::Say { text, token, scored } => {
                            let logprobs: Vec<serde_json::Value> = (token.zip(scored))
                                .map(|(tok, (lp, alts))| chat_token(t, tok, lp, &alts))
                                .into_iter()
                                .collect();
                            sink.say(&text, logprobs.into());
                        }
                        Routed::Call(e) => sink.call(&e, &call_id(p.number, e.index())),
                    }
                }
            }
            Progress::Ended(g) | Progress::Cancelled(g) => {
                end = Some(g);
                break;
            }
            Progress::Refused(why) => {
                sink.error(&why);
                return None;
            }
        }
        if !sink.ok() {
            // The client went away.
            let _ = tx.send((Message::Gone(p.number), None));
            return None;
        }
    }
    let Some(g) = end else {
        sink.error("the server stopped before the request ended");
        return None;
    };
    let RouteEnd { reasoning, called, thought, rest, .. } = router.end(p.number, p.tools.as_deref(), &g.tokens);
    if reasoning.is_some() {
        sink.close_reasoning(&thought);
    }
    Some(Followed { g, reasoning, called, rest })
}

/// A response's events as its completion comes: `response.created` and `response.in_progress`,
/// then each output item added, its text (reasoning, then the message's) in deltas as it
/// settles and done, the calls each added with their arguments and done once the completion
/// ends, and `response.completed` (`response.incomplete` at the token budget) with the whole
/// response; a refused request ends it with an `error` event, a client that goes away cancels it.
fn stream_response(
    conn: &mut Conn,
    p: &Pending,
    tx: &mpsc::Sender<(Message, Option<mpsc::Sender<usize>>)>,
    site: &Site,
    t: &Arc<Tokenizer>,
    given: &serde_json::Value,
    created: u64,
) {
    use crate::responses::{response, usage};
    use serde_json::json;
    conn.keep = false;
    let ok = conn.stream.write_all(EVENT_STREAM.as_bytes()).is_ok();
    let number = p.number;
    let mut e = ResponseEvents {
        stream: &mut conn.stream,
        sequence: 0,
        ok,
        number,
        next: 0,
        reasoning_at: None,
        reasoning_done: false,
        thought_text: String::new(),
        message_at: None,
        message_done: false,
        message_text: String::new(),
        calls: Vec::new(),
        done: Default::default(),
    };
    let model = site.model.as_str();
    let snapshot = |status: &str, output: Vec<serde_json::Value>, used: serde_json::Value| json!({ "response": response(number, created, model, given, status, output, used) });
    e.send("response.created", snapshot("in_progress", Vec::new(), serde_json::Value::Null));
    e.send("response.in_progress", snapshot("in_progress", Vec::new(), serde_json::Value::Null));
    let Some(Followed { g, reasoning, rest, .. }) = follow(p, t, &mut e, tx) else { return };
    // The message: every reply has one unless it only called.
    if e.calls.is_empty() || e.message_at.is_some() {
        e.close_message(&rest);
    }
    for k in 0..e.calls.len() {
        e.end_call(k, "incomplete");
    }
    let output: Vec<serde_json::Value> = e.done.values().cloned().collect();
    let status = if finish_reason(&g) == "length" { "incomplete" } else { "completed" };
    let used = usage(p.prompt.len(), g.reused, g.tokens.len(), reasoning.map_or(0, |r| r.len()));
    e.send(&format!("response.{status}"), snapshot(status, output, used));
}

/// Anthropic's Messages API ([`crate::messages`]): the request as a chat completion's, answered
/// as a message of content blocks, or streamed as Anthropic's events; errors in its shape.
fn messages(conn: &mut Conn, body: &[u8], tx: &mpsc::Sender<(Message, Option<mpsc::Sender<usize>>)>, site: &Site) {
    use crate::messages::{content, error, message, stop_reason, usage};
    let model = site.model.as_str();
    let refuse = |conn: &mut Conn, status: &str, kind: &str, e: &str| {
        let _ = respond(conn, status, &error(kind, e));
    };
    let (request, stream, t) = match one_chat(crate::messages::chat_body(body), site) {
        Ok(r) => r,
        Err(e) => return refuse(conn, "400 Bad Request", "invalid_request_error", &e),
    };
    let given: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let stops: Vec<String> = given["stop_sequences"]
        .as_array()
        .map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let Some(p) = queue(Api::Chat, request, tx) else {
        return refuse(conn, "503 Service Unavailable", "overloaded_error", "the server is stopping");
    };
    if stream {
        conn.keep = false;
        let ok = conn.stream.write_all(EVENT_STREAM.as_bytes()).is_ok();
        let mut e = MessageEvents {
            stream: &mut conn.stream,
            ok,
            next: 0,
            thinking_at: None,
            thinking_done: false,
            text_at: None,
            text_done: false,
            calls: Vec::new(),
        };
        let start = message(p.number, model, Vec::new(), ("", serde_json::Value::Null), usage(p.prompt.len(), 0, 0));
        e.send("message_start", serde_json::json!({ "message": start }));
        let Some(Followed { g, called, rest, .. }) = follow(&p, t, &mut e, tx) else { return };
        let answer = p.split(&g).1;
        if e.calls.is_empty() || e.text_at.is_some() {
            // The text block: every reply has one unless it only called.
            e.close_text(&rest);
        }
        for k in 0..e.calls.len() {
            e.stop_call(k);
        }
        let (reason, sequence) = stop_reason(finish_reason(&g), called.is_some(), &stops, &t.decode(&answer, true));
        let delta = serde_json::json!({ "stop_reason": reason, "stop_sequence": sequence });
        let used = usage(p.prompt.len(), g.reused, g.tokens.len());
        e.send("message_delta", serde_json::json!({ "delta": delta, "usage": used }));
        e.send("message_stop", serde_json::json!({}));
        return;
    }
    let g = match wait(&p) {
        Ok(g) => g,
        Err((status, e)) => {
            let kind = if status.starts_with("400") { "invalid_request_error" } else { "api_error" };
            return refuse(conn, status, kind, &e);
        }
    };
    let Whole { thought, answer, text, called, .. } = p.whole(&g, t);
    let stop = stop_reason(finish_reason(&g), called.is_some(), &stops, &t.decode(&answer, true));
    let blocks = content(thought.as_deref(), &text, called.as_ref());
    let reply = message(p.number, model, blocks, stop, usage(p.prompt.len(), g.reused, g.tokens.len()));
    let _ = respond(conn, "200 OK", &reply);
}

/// A streamed message's events as it writes them: its thinking and text blocks opened (at the
/// next index), added to and stopped, its tool_use blocks whole.
struct MessageEvents<'a> {
    stream: &'a mut TcpStream,
    ok: bool,
    /// The next block's index.
    next: usize,
    thinking_at: Option<usize>,
    thinking_done: bool,
    text_at: Option<usize>,
    text_done: bool,
    /// The tool_use blocks begun: each one's index and whether it stopped.
    calls: Vec<(usize, bool)>,
}

impl MessageEvents<'_> {
    /// One event, its type named in `event:` and in the data.
    fn send(&mut self, kind: &str, mut data: serde_json::Value) {
        data["type"] = kind.into();
        let text = format!("event: {kind}\ndata: {data}\n\n");
        self.ok = self.ok && self.stream.write_all(text.as_bytes()).and_then(|_| self.stream.flush()).is_ok();
    }

    /// A block started at the next index: that index.
    fn start(&mut self, block: serde_json::Value) -> usize {
        let at = self.next;
        self.next += 1;
        self.send("content_block_start", serde_json::json!({ "index": at, "content_block": block }));
        at
    }

    fn thinking(&mut self) -> usize {
        match self.thinking_at {
            Some(at) => at,
            None => {
                let at = self.start(serde_json::json!({ "type": "thinking", "thinking": "", "signature": "" }));
                *self.thinking_at.insert(at)
            }
        }
    }

    fn text(&mut self) -> usize {
        match self.text_at {
            Some(at) => at,
            None => {
                let at = self.start(serde_json::json!({ "type": "text", "text": "" }));
                *self.text_at.insert(at)
            }
        }
    }

    fn delta(&mut self, at: usize, delta: serde_json::Value) {
        self.send("content_block_delta", serde_json::json!({ "index": at, "delta": delta }));
    }

    /// The text block's last text (`rest`) and its stop (once; started first if it was not).
    fn close_text(&mut self, rest: &str) {
        if std::mem::replace(&mut self.text_done, true) {
            return;
        }
        self.say(rest, serde_json::Value::Null);
        let at = self.text();
        self.send("content_block_stop", serde_json::json!({ "index": at }));
    }

    /// Call `index`'s block stopped (once).
    fn stop_call(&mut self, index: usize) {
        let Some((at, stopped)) = self.calls.get_mut(index) else { return };
        if !std::mem::replace(stopped, true) {
            let at = *at;
            self.send("content_block_stop", serde_json::json!({ "index": at }));
        }
    }
}

impl Sink for MessageEvents<'_> {
    fn think(&mut self, piece: &str) {
        let at = self.thinking();
        if !piece.is_empty() {
            self.delta(at, serde_json::json!({ "type": "thinking_delta", "thinking": piece }));
        }
    }
    fn close_reasoning(&mut self, rest: &str) {
        self.think(rest);
        if !std::mem::replace(&mut self.thinking_done, true) {
            let at = self.thinking();
            self.delta(at, serde_json::json!({ "type": "signature_delta", "signature": "" }));
            self.send("content_block_stop", serde_json::json!({ "index": at }));
        }
    }
    fn say(&mut self, piece: &str, _: serde_json::Value) {
        if !piece.is_empty() {
            let at = self.text();
            self.delta(at, serde_json::json!({ "type": "text_delta", "text": piece }));
        }
    }
    /// A call as it is written: its tool_use block started (the text block, if any, stopped
    /// first), its input's JSON in deltas, stopped.
    fn call(&mut self, event: &crate::tools::CallEvent, id: &str) {
        use crate::tools::CallEvent;
        match event {
            CallEvent::Start { name, .. } => {
                if self.text_at.is_some() {
                    self.close_text("");
                }
                let at = self.start(serde_json::json!({ "type": "tool_use", "id": id, "name": name, "input": {} }));
                self.calls.push((at, false));
            }
            CallEvent::Arguments { index, text } => {
                if let Some(&(at, _)) = self.calls.get(*index) {
                    self.delta(at, serde_json::json!({ "type": "input_json_delta", "partial_json": text }));
                }
            }
            CallEvent::End { index } => self.stop_call(*index),
        }
    }
    fn error(&mut self, message: &str) {
        let e = crate::messages::error("invalid_request_error", message);
        self.send("error", e);
    }
    fn ok(&self) -> bool {
        self.ok
    }
}

/// The head of a reply of server-sent events.
const EVENT_STREAM: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";

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
    tx: &mpsc::Sender<(Message, Option<mpsc::Sender<usize>>)>,
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

    /// Prometheus' text format: counters by how requests ended, gauges, cumulative histogram
    /// buckets with their sum and count.
    #[test]
    fn metrics_render_as_prometheus_reads_them() {
        let mut m = Metrics::default();
        m.arrived(5);
        m.arrived(7);
        m.arrived(1);
        m.time_to_first_token.observe(0.02);
        m.time_to_first_token.observe(3.0);
        let g = Generation { reused: 64, ..Generation::alone(vec![1, 2, 3], false, 0.0, 0.0) };
        m.ended(1, 0.5, Some(&g));
        m.ended(3, 0.0, None);
        m.load = crate::session::Load { running: 2, waiting: 5, cache_usage: 0.25 };
        let text = m.render();
        for line in [
            "v3r_requests_running 2",
            "v3r_requests_waiting 5",
            "v3r_kv_cache_usage_ratio 0.25",
            "v3r_requests_total{finish=\"length\"} 1",
            "v3r_requests_total{finish=\"refused\"} 1",
            "v3r_requests_total{finish=\"stop\"} 0",
            "v3r_requests_in_flight 1",
            "v3r_prompt_tokens_total 13",
            "v3r_cached_prompt_tokens_total 64",
            "v3r_generation_tokens_total 3",
            "v3r_time_to_first_token_seconds_bucket{le=\"0.01\"} 0",
            "v3r_time_to_first_token_seconds_bucket{le=\"0.025\"} 1",
            "v3r_time_to_first_token_seconds_bucket{le=\"5\"} 2",
            "v3r_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2",
            "v3r_time_to_first_token_seconds_sum 3.02",
            "v3r_request_latency_seconds_count 1",
            "# TYPE v3r_request_latency_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    /// The one request of a body that asks for one choice, and whether it streams.
    fn one(a: ApiRequest) -> (Request, bool) {
        assert_eq!((a.requests.len(), a.n), (1, 1));
        (a.requests.into_iter().next().expect("a request"), a.stream)
    }

    fn defaults() -> RequestDefaults {
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

    /// Request lines, headers and bodies as clients send them; what is not HTTP is said.
    #[test]
    fn requests_are_read_to_their_content_length() {
        let raw = "POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\ncontent-length: 13\r\nauthorization:  Bearer k1 \r\n\r\n{\"prompt\": 1}extra";
        let r = read_request(&mut raw.as_bytes()).unwrap().unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), &r.body[..], r.authorization.as_deref(), r.keep_alive),
            ("POST", "/v1/completions", &b"{\"prompt\": 1}"[..], Some("Bearer k1"), true)
        );
        // Anthropic's clients' key header; Authorization first where both come.
        let raw = "POST /v1/messages HTTP/1.1\r\nx-api-key: k2\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(read_request(&mut raw.as_bytes()).unwrap().unwrap().authorization.as_deref(), Some("Bearer k2"));
        let raw = "GET / HTTP/1.1\r\nAuthorization: Bearer k1\r\nX-Api-Key: k2\r\n\r\n";
        assert_eq!(read_request(&mut raw.as_bytes()).unwrap().unwrap().authorization.as_deref(), Some("Bearer k1"));
        let r = read_request(&mut "GET /health HTTP/1.0\r\n\r\n".as_bytes()).unwrap().unwrap();
        assert_eq!((r.method.as_str(), r.body.len(), r.authorization, r.keep_alive), ("GET", 0, None, false));
        // Connection: close (1.1) and keep-alive (1.0); two requests read one after the other;
        // the client's close before a request is no request.
        let two = "GET /a HTTP/1.1\r\nConnection: Close\r\n\r\nGET /b HTTP/1.0\r\nconnection: keep-alive\r\n\r\n";
        let mut reader = two.as_bytes();
        let a = read_request(&mut reader).unwrap().unwrap();
        let b = read_request(&mut reader).unwrap().unwrap();
        assert_eq!((a.path.as_str(), a.keep_alive, b.path.as_str(), b.keep_alive), ("/a", false, "/b", true));
        assert!(read_request(&mut reader).unwrap().is_none());
        for (raw, err) in [
            ("hello\r\n\r\n", "not an HTTP request line"),
            ("GET / HTTP/2\r\n\r\n", "only HTTP/1.x"),
            ("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", "Content-Length"),
            ("POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", "reading a body of 10 bytes"),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
            ("GET / HTTP/1.1\r\nHost: a\r\n", "the headers end"),
        ] {
            let got = read_request(&mut raw.as_bytes()).unwrap_err();
            assert!(got.contains(err), "{raw:?}: {got}");
        }
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
                    0 => crate::responses::chat_body(bytes.as_bytes()).map(|(c, _)| c.to_string()),
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
