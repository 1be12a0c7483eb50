//! Anthropic's Messages API (`POST /v1/messages`), served through the chat completions path as
//! DeepSeek's own API offers it (for clients written against Anthropic's, such as coding agents): a
//! request's `system` and `messages` (text, `tool_use` and `tool_result` blocks) become the chat's
//! messages, its `tools` (`input_schema`) and `tool_choice` (`auto`, `any`, `tool`, `none`) the
//! chat's functions and choice, `max_tokens`, `stop_sequences` and the sampling fields the chat's;
//! the completion comes back as content blocks — `thinking` (with `--reasoning-parser`), `text`,
//! a `tool_use` a call — with Anthropic's `stop_reason`, whole or streamed as its events.
//!
//! `cache_control` marks are taken and have no effect here (the server reuses whole cache pages a
//! prompt shares with earlier ones anyway: `cache_read_input_tokens`); images, documents and
//! server tools are refused by name.

use serde_json::{json, Map, Value};

use std::io::Write;
use std::net::TcpStream;

use crate::http::{follow, one_chat, queue, respond, wait, Conn, Followed, Sink, Site, ToLoop, Whole, EVENT_STREAM};
use crate::openai::{finish_reason, Api, Called};

/// The request fields taken: the API's (its older sampling fields too), then vLLM's sampling
/// extensions. `cache_control`, `diagnostics`, `inference_geo`, `speed`, `user_profile_id` and
/// `workspace_id` change nothing here.
const FIELDS: [&str; 21] = [
    "cache_control",
    "diagnostics",
    "inference_geo",
    "speed",
    "user_profile_id",
    "workspace_id",
    "output_config",
    "model",
    "max_tokens",
    "messages",
    "system",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "stream",
    "tools",
    "tool_choice",
    "metadata",
    "thinking",
    "service_tier",
];

/// A Messages request's body as a chat completions body, and whether it streams.
pub fn chat_body(body: &[u8]) -> Result<(Value, bool), String> {
    let o = crate::responses::body_object(body, &FIELDS)?;
    let given = |k: &str| o.get(k).filter(|x| !x.is_null());
    let max_tokens = given("max_tokens").ok_or("no \"max_tokens\" (the most tokens of the reply)")?;
    let mut chat = Map::new();
    let messages = messages(given("system"), o.get("messages"))?;
    // A final assistant message is the reply's start, which the model continues (Anthropic's
    // prefill): the template's text cut after it.
    if messages.last().is_some_and(|m| m["role"] == "assistant" && m.get("tool_calls").is_none()) {
        chat.insert("continue_final_message".into(), true.into());
    }
    chat.insert("messages".into(), messages.into());
    chat.insert("max_completion_tokens".into(), max_tokens.clone());
    if let Some(stops) = given("stop_sequences") {
        let ok = stops.as_array().is_some_and(|s| s.iter().all(Value::is_string));
        if !ok {
            return Err(format!("stop_sequences: {stops} is not a list of texts"));
        }
        if stops.as_array().is_some_and(|s| !s.is_empty()) {
            chat.insert("stop".into(), stops.clone());
        }
    }
    if let Some(tools) = given("tools") {
        chat.insert("tools".into(), function_tools(tools)?);
    }
    if let Some(choice) = given("tool_choice") {
        let (choice, parallel) = tool_choice(choice)?;
        chat.insert("tool_choice".into(), choice);
        if let Some(p) = parallel {
            chat.insert("parallel_tool_calls".into(), p.into());
        }
    }
    // Structured output: `output_config.format` (a JSON schema); `effort` changes nothing here.
    if let Some(c) = given("output_config") {
        if let Some(k) = c.as_object().and_then(|c| c.keys().find(|k| *k != "format" && *k != "effort")) {
            return Err(format!("output_config: unknown field '{k}' (format, effort)"));
        }
        match c.get("format").filter(|f| !f.is_null()) {
            None => {}
            Some(f) if f["type"] == "json_schema" && f.get("schema").is_some() => {
                let format = json!({ "type": "json_schema", "json_schema": { "schema": f["schema"] } });
                chat.insert("response_format".into(), format);
            }
            Some(f) => {
                return Err(format!("output_config.format: {f} is not {{\"type\": \"json_schema\", \"schema\": ...}}"))
            }
        }
    }
    // Thinking asked for: DeepSeek-V3.1's template thinks when `thinking` is set.
    if let Some(t) = given("thinking") {
        let on = match t["type"].as_str() {
            Some("enabled" | "adaptive" | "between_tools") => true,
            Some("disabled") => false,
            _ => {
                return Err(format!(
                    "thinking: {t} is not {{\"type\": \"enabled\", \"adaptive\", \"between_tools\" or \"disabled\"}}"
                ))
            }
        };
        if on && given("chat_template_kwargs").is_none() {
            chat.insert("chat_template_kwargs".into(), json!({ "thinking": true }));
        }
    }
    let stream = crate::responses::pass_on(&o, &["model", "temperature", "top_p"], &mut chat)?;
    Ok((chat.into(), stream))
}

/// A `count_tokens` request's body (a Messages request without `max_tokens`) as a chat
/// completions body.
pub fn count_body(body: &[u8]) -> Result<Value, String> {
    let mut o = crate::responses::body_object(body, &FIELDS)?;
    if let Some(k) = ["max_tokens", "stream"].iter().find(|k| o.contains_key(**k)) {
        return Err(format!("unknown field '{k}' (count_tokens counts the prompt)"));
    }
    o.insert("max_tokens".into(), 1.into());
    chat_body(Value::Object(o).to_string().as_bytes()).map(|(chat, _)| chat)
}

/// The chat's messages: `system` first, then each message's blocks — a user's tool results as
/// tool messages (before its text), an assistant's `tool_use` blocks as its tool calls; thinking
/// blocks dropped (as R1's template drops earlier reasoning).
fn messages(system: Option<&Value>, messages: Option<&Value>) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    if let Some(s) = system {
        out.push(json!({ "role": "system", "content": text_of(s, "system")? }));
    }
    let list = match messages {
        Some(Value::Array(m)) if !m.is_empty() => m,
        _ => return Err("no \"messages\" (a list of user and assistant messages)".into()),
    };
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m["role"].as_str().unwrap_or_default();
        if role != "user" && role != "assistant" {
            return Err(format!("{at}.role: {} is not user or assistant", m["role"]));
        }
        let blocks = match &m["content"] {
            Value::String(text) => {
                out.push(json!({ "role": role, "content": text }));
                continue;
            }
            Value::Array(blocks) => blocks,
            x => return Err(format!("{at}.content: {x} is not a text or a list of blocks")),
        };
        let (mut text, mut calls) = (String::new(), Vec::new());
        for (k, b) in blocks.iter().enumerate() {
            let at = format!("{at}.content[{k}]");
            match (role, b["type"].as_str().unwrap_or_default()) {
                (_, "text") => text.push_str(b["text"].as_str().ok_or_else(|| format!("{at}: no \"text\""))?),
                (_, "thinking" | "redacted_thinking") => {}
                ("assistant", "tool_use") => {
                    let id = b["id"].as_str().ok_or_else(|| format!("{at}: no \"id\""))?;
                    let name = b["name"].as_str().ok_or_else(|| format!("{at}: no \"name\""))?;
                    let input =
                        b.get("input").filter(|x| x.is_object()).ok_or_else(|| format!("{at}: no \"input\" object"))?;
                    calls.push(json!({ "id": id, "type": "function",
                        "function": { "name": name, "arguments": input.to_string() } }));
                }
                ("user", "tool_result") => {
                    let id = b["tool_use_id"].as_str().ok_or_else(|| format!("{at}: no \"tool_use_id\""))?;
                    let content = match b.get("content") {
                        None | Some(Value::Null) => String::new(),
                        Some(c) => text_of(c, &format!("{at}.content"))?,
                    };
                    let content = match b["is_error"].as_bool() {
                        Some(true) => format!("Error: {content}"),
                        _ => content,
                    };
                    out.push(json!({ "role": "tool", "tool_call_id": id, "content": content }));
                }
                (_, t) => {
                    return Err(format!(
                        "{at}: {t} blocks are not supported in {role} messages (text, tool_use from the assistant, \
                         tool_result from the user, thinking)"
                    ))
                }
            }
        }
        match (role, calls.is_empty()) {
            ("assistant", false) => {
                let content = if text.is_empty() { Value::Null } else { text.into() };
                out.push(json!({ "role": "assistant", "content": content, "tool_calls": calls }));
            }
            _ if !text.is_empty() => out.push(json!({ "role": role, "content": text })),
            _ => {}
        }
    }
    Ok(out)
}

/// A text, or text blocks joined.
fn text_of(x: &Value, at: &str) -> Result<String, String> {
    match x {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => blocks
            .iter()
            .enumerate()
            .map(|(k, b)| match (b["type"].as_str(), b["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t),
                (t, _) => Err(format!(
                    "{at}[{k}]: {} blocks are not supported (text only)",
                    t.map_or(b.to_string(), str::to_string)
                )),
            })
            .collect(),
        x => Err(format!("{at}: {x} is not a text or text blocks")),
    }
}

/// Client tools (`{"name", "description", "input_schema"}`) as the chat's functions.
fn function_tools(tools: &Value) -> Result<Value, String> {
    let tools = tools.as_array().ok_or_else(|| format!("tools: {tools} is not a list"))?;
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| match (t["type"].as_str(), t["name"].as_str(), t.get("input_schema")) {
            (None | Some("custom"), Some(name), Some(schema)) => {
                let mut f = json!({ "name": name, "parameters": schema });
                if let Some(d) = t.get("description") {
                    f["description"] = d.clone();
                }
                Ok(json!({ "type": "function", "function": f }))
            }
            (Some(kind), _, _) if kind != "custom" => {
                Err(format!("tools[{i}]: {kind} is not supported (client tools with an input_schema only)"))
            }
            _ => Err(format!("tools[{i}]: a tool needs a \"name\" and an \"input_schema\"")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::from)
}

/// `tool_choice` as the chat's, and whether calls may be parallel (None: not said).
fn tool_choice(x: &Value) -> Result<(Value, Option<bool>), String> {
    let parallel = x["disable_parallel_tool_use"].as_bool().map(|d| !d);
    let choice = match (x["type"].as_str(), x["name"].as_str()) {
        (Some("auto"), _) => "auto".into(),
        (Some("any"), _) => "required".into(),
        (Some("none"), _) => "none".into(),
        (Some("tool"), Some(name)) => json!({ "type": "function", "function": { "name": name } }),
        _ => return Err(format!("tool_choice: {x} is not auto, any, none or {{\"type\": \"tool\", \"name\": ...}}")),
    };
    Ok((choice, parallel))
}

/// A reply's content blocks: its thinking, its text (unless it only called), a `tool_use` a call.
pub fn content(thinking: Option<&str>, text: &str, called: Option<&Called>) -> Vec<Value> {
    let mut blocks = Vec::new();
    if let Some(t) = thinking {
        blocks.push(json!({ "type": "thinking", "thinking": t, "signature": "" }));
    }
    if !text.is_empty() || called.is_none() {
        blocks.push(json!({ "type": "text", "text": text }));
    }
    blocks.extend(crate::responses::calls(called).iter().map(tool_use));
    blocks
}

/// A call (an element of [`Called::tool_calls`]) as a `tool_use` block, its input the arguments'
/// object.
pub fn tool_use(call: &Value) -> Value {
    let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
    let input: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
    json!({ "type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": input })
}

/// Anthropic's `stop_reason` (and `stop_sequence`): `tool_use` when the reply called, `max_tokens`
/// at the budget, `stop_sequence` at one of `stops` (the first whose text `full` holds), else
/// `end_turn`.
pub fn stop_reason(finish: &str, called: bool, stops: &[String], full: &str) -> (&'static str, Value) {
    match finish {
        _ if called => ("tool_use", Value::Null),
        "length" => ("max_tokens", Value::Null),
        "stop" => {
            let first = stops.iter().filter_map(|s| full.find(s.as_str()).map(|at| (at, s))).min();
            match first {
                Some((_, s)) => ("stop_sequence", s.clone().into()),
                None => ("end_turn", Value::Null),
            }
        }
        _ => ("end_turn", Value::Null),
    }
}

/// The message object.
pub fn message(number: usize, model: &str, content: Vec<Value>, stop: (&str, Value), usage: Value) -> Value {
    let stop_reason = if stop.0.is_empty() { Value::Null } else { stop.0.into() };
    json!({
        "id": format!("msg_{number}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop.1,
        "usage": usage,
    })
}

/// The usage: the prompt's tokens (`cached`: those read from earlier requests' pages, the rest
/// prefilled) and the reply's.
pub fn usage(prompt: usize, cached: usize, output: usize) -> Value {
    json!({
        "input_tokens": prompt - cached.min(prompt),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": output,
    })
}

/// An error in Anthropic's shape.
pub fn error(kind: &str, message: &str) -> Value {
    json!({ "type": "error", "error": { "type": kind, "message": message } })
}

/// Answers a `POST /v1/messages` on `conn` ([`crate::http`]'s server): the request as a chat
/// completion's, queued to the serving loop through `tx`, answered as a message of content
/// blocks, or streamed as Anthropic's events; errors in its shape.
pub(crate) fn answer(conn: &mut Conn, body: &[u8], tx: &ToLoop, site: &Site) {
    let model = site.model.as_str();
    let refuse = |conn: &mut Conn, status: &str, kind: &str, e: &str| {
        let _ = respond(conn, status, &error(kind, e));
    };
    let (request, stream, t) = match one_chat(chat_body(body), site) {
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
        let e = error("invalid_request_error", message);
        self.send("error", e);
    }
    fn ok(&self) -> bool {
        self.ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks become the chat's messages: system blocks joined, a user's tool results as tool
    /// messages before its text, an assistant's tool_use blocks its tool calls, thinking dropped;
    /// tools, tool_choice, stop_sequences and thinking as the chat's.
    #[test]
    fn requests_become_chat_bodies() {
        let body = json!({
            "model": "m", "max_tokens": 64, "temperature": 0.3, "top_k": 4,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1_0", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1_0", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And now?"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "call_2_0", "name": "now", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_2_0", "content": "x", "is_error": true}]},
            ],
            "tools": [{"name": "now", "description": "the time", "input_schema": {"type": "object", "properties": {}}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["\n\n"],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
        });
        let (chat, stream) = chat_body(body.to_string().as_bytes()).unwrap();
        assert!(!stream);
        let want = json!({
            "model": "m", "max_completion_tokens": 64, "temperature": 0.3, "top_k": 4, "stop": ["\n\n"],
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "call_1_0", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1_0", "content": "sunny"},
                {"role": "user", "content": "And now?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_2_0", "type": "function",
                    "function": {"name": "now", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_2_0", "content": "Error: x"},
            ],
            "tools": [{"type": "function", "function": {"name": "now", "description": "the time",
                "parameters": {"type": "object", "properties": {}}}}],
            "tool_choice": "required", "parallel_tool_calls": false,
            "chat_template_kwargs": {"thinking": true},
        });
        assert_eq!(chat, want);
        // A final assistant message is the reply's start (a prefill): the chat continues it.
        let prefill = json!({"max_tokens": 8, "messages": [
            {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My answer:"}]});
        let (chat, _) = chat_body(prefill.to_string().as_bytes()).unwrap();
        assert_eq!(chat["continue_final_message"], true);
        let asked = json!({"max_tokens": 8, "messages": [{"role": "user", "content": "Name a colour."}]});
        assert!(chat_body(asked.to_string().as_bytes()).unwrap().0.get("continue_final_message").is_none());
    }

    #[test]
    fn what_is_not_served_is_refused_by_name() {
        for (body, error) in [
            (r#"{"messages": [{"role": "user", "content": "x"}]}"#, "no \"max_tokens\""),
            (r#"{"max_tokens": 1, "messages": []}"#, "no \"messages\""),
            (r#"{"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "n": 2}"#, "unknown field 'n'"),
            (
                r#"{"max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}"#,
                "messages[0].role: \"system\" is not user or assistant",
            ),
            (
                r#"{"max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}"#,
                "messages[0].content[0]: image blocks are not supported in user messages",
            ),
            (
                r#"{"max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]}"#,
                "tool_use blocks are not supported in user messages",
            ),
            (
                r#"{"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}"#,
                "tools[0]: web_search_20250305 is not supported",
            ),
            (
                r#"{"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]}"#,
                "needs a \"name\" and an \"input_schema\"",
            ),
            (
                r#"{"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool"}}"#,
                "tool_choice: ",
            ),
            (
                r#"{"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "stop_sequences": "x"}"#,
                "stop_sequences: \"x\" is not a list",
            ),
            (
                r#"{"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "on"}}"#,
                "thinking: ",
            ),
            (
                r#"{"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "system": [{"type": "image"}]}"#,
                "system[0]: image blocks are not supported (text only)",
            ),
        ] {
            let e = chat_body(body.as_bytes()).unwrap_err();
            assert!(e.contains(error), "{body}: {e}");
        }
    }

    /// count_tokens takes a request without max_tokens (refusing one with it or stream), read
    /// as a request is.
    #[test]
    fn count_tokens_bodies_are_requests_without_a_budget() {
        let body = br#"{"model": "m", "system": "s", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}]}"#;
        let chat = count_body(body).unwrap();
        assert_eq!(chat["messages"][1], json!({"role": "user", "content": "x"}));
        assert_eq!(chat["tools"][0]["function"]["name"], "f");
        for (body, error) in [
            (r#"{"max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}"#, "unknown field 'max_tokens'"),
            (r#"{"stream": true, "messages": [{"role": "user", "content": "x"}]}"#, "unknown field 'stream'"),
            (r#"{"messages": []}"#, "no \"messages\""),
        ] {
            let e = count_body(body.as_bytes()).unwrap_err();
            assert!(e.contains(error), "{body}: {e}");
        }
    }

    /// Content blocks and stop reasons: thinking, then text (left out when the reply only
    /// called), then a tool_use a call with its arguments as input; the stop sequence named is
    /// the first one the reply's text holds.
    #[test]
    fn replies_become_content_blocks() {
        let called = Called {
            content: String::new(),
            tool_calls: json!([{"id": "call_3_0", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]),
        };
        let blocks = content(Some("hmm"), "", Some(&called));
        assert_eq!(
            blocks,
            vec![
                json!({"type": "thinking", "thinking": "hmm", "signature": ""}),
                json!({"type": "tool_use", "id": "call_3_0", "name": "f", "input": {"a": 1}}),
            ]
        );
        assert_eq!(content(None, "", None), vec![json!({"type": "text", "text": ""})]);
        let stops = ["END".to_string(), "\n".to_string()];
        assert_eq!(stop_reason("stop", false, &stops, "ab\ncEND"), ("stop_sequence", "\n".into()));
        assert_eq!(stop_reason("stop", false, &stops, "abc"), ("end_turn", Value::Null));
        assert_eq!(stop_reason("stop", true, &stops, "a\n"), ("tool_use", Value::Null));
        assert_eq!(stop_reason("length", false, &stops, ""), ("max_tokens", Value::Null));
        assert_eq!(stop_reason("eos", false, &stops, ""), ("end_turn", Value::Null));
        assert_eq!(usage(10, 4, 3)["input_tokens"], 6);
    }
}
