//! OpenAI's Responses API (`POST /v1/responses`), served through the chat completions path: a
//! request's `instructions` and `input` items become the chat's messages (its `function_call` and
//! `function_call_output` items an assistant's tool calls and the tools' outputs), its function
//! `tools`, `tool_choice`, `text.format` and `max_output_tokens` the chat's; the completion comes
//! back as output items — a `reasoning` item (with `--reasoning-parser`), a `message` of
//! `output_text`, and a `function_call` item a call — whole, or streamed as the API's events.
//!
//! Responses are kept in memory ([`Store`]: the last [`STORED`], at most [`STORED_BYTES`], unless
//! a request says `store: false`): `previous_response_id` continues one, its conversation rebuilt from the stored turns;
//! `GET` and `DELETE /v1/responses/ID` retrieve and let go of one. Nothing outlives the server.

use serde_json::{json, Map, Value};

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;

use crate::http::{
    follow, now, one_chat, queue, respond, respond_error, wait, Conn, Followed, Pending, Sink, Site, ToLoop, Whole,
    EVENT_STREAM,
};
use crate::openai::{chat_token, finish_reason, Api, Called};
use crate::tokenizer::Tokenizer;

/// The request fields taken: the API's, then vLLM's sampling extensions (passed on as the chat
/// path takes them). `prompt_cache_key` and `prompt_cache_retention` (the server reuses the
/// whole cache pages a prompt shares with earlier ones anyway), `safety_identifier`,
/// `service_tier` and `stream_options` change nothing here.
const FIELDS: [&str; 25] = [
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "stream",
    "text",
    "reasoning",
    "store",
    "metadata",
    "user",
    "previous_response_id",
    "include",
    "truncation",
    "top_logprobs",
    "background",
    "stream_options",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "service_tier",
];

/// A body's JSON object, its fields among `fields` (an API's own) and vLLM's sampling fields
/// (but `response_format`: each API says its format its own way), `seed` and
/// `chat_template_kwargs`; others refused by name.
pub(crate) fn body_object(body: &[u8], fields: &[&str]) -> Result<Map<String, Value>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not a JSON body: {e}"))?;
    let Value::Object(o) = v else { return Err("the body is not a JSON object".into()) };
    let extra = crate::cli::SAMPLING_FIELDS.iter().chain(&["seed", "chat_template_kwargs"]);
    let mut all: Vec<&str> = fields.to_vec();
    all.extend(extra.filter(|f| **f != "response_format" && !fields.contains(f)));
    if let Some(k) = o.keys().find(|k| !all.contains(&k.as_str())) {
        return Err(format!("unknown field '{k}' ({})", all.join(", ")));
    }
    Ok(o)
}

/// The fields passed on as they are (`same`, vLLM's sampling fields, `seed` and
/// `chat_template_kwargs`) copied from `o` into `chat`, and whether the reply streams.
pub(crate) fn pass_on(o: &Map<String, Value>, same: &[&str], chat: &mut Map<String, Value>) -> Result<bool, String> {
    let given = |k: &str| o.get(k).filter(|x| !x.is_null());
    for k in same.iter().chain(&crate::cli::SAMPLING_FIELDS).chain(&["seed", "chat_template_kwargs"]) {
        if let Some(x) = given(k) {
            chat.insert(k.to_string(), x.clone());
        }
    }
    match given("stream") {
        None => Ok(false),
        Some(x) => x.as_bool().ok_or_else(|| format!("stream: {x} is not true or false")),
    }
}

/// A Responses request read: the chat completions body it makes and whether it streams, the
/// response it continues, and this turn's messages (its input's, instructions left out: those of
/// a stored response are not carried on, as OpenAI's are not).
#[derive(Debug)]
pub struct Turn {
    pub chat: Value,
    pub stream: bool,
    pub previous: Option<String>,
    pub input: Vec<Value>,
    /// The request's `input` as Responses items (a text as a user message; messages given as
    /// `role` and `content` as `message` items of content parts), for `input_items`.
    pub items: Vec<Value>,
}

/// A request's `input` as Responses items: a text is one user message; a message given as `role`
/// and `content` a `message` item, its text content one part (`input_text`, or the assistant's
/// `output_text`); other items as given.
fn input_items(input: Option<&Value>) -> Vec<Value> {
    let message = |role: &Value, content: &Value| {
        let kind = if role == "assistant" { "output_text" } else { "input_text" };
        let content = match content {
            Value::String(text) => json!([{ "type": kind, "text": text }]),
            parts => parts.clone(),
        };
        json!({ "type": "message", "role": role, "content": content })
    };
    match input {
        Some(Value::String(text)) => vec![message(&"user".into(), &text.as_str().into())],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match (i.get("type"), i.get("role")) {
                (None, Some(role)) => message(role, &i["content"]),
                _ => i.clone(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A page of a response's input items as OpenAI lists them (`GET /v1/responses/ID/input_items`),
/// by the query's `order` (`desc`, the default: the last given first; or `asc`), `limit` (1 to
/// 100, 20 by default) and `after` / `before` (an item id the page starts after, or ends before).
pub fn items_page(items: Vec<Value>, query: &str) -> Result<Value, String> {
    let (mut order, mut limit, mut after, mut before) = ("desc".to_string(), 20usize, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "order" if v == "asc" || v == "desc" => order = v.to_string(),
            "order" => return Err(format!("order: {v} is not asc or desc")),
            "limit" => {
                limit = v.parse().ok().filter(|n| (1..=100).contains(n)).ok_or(format!("limit: {v} is not 1 to 100"))?
            }
            "after" => after = Some(v.to_string()),
            "before" => before = Some(v.to_string()),
            // Reasoning is not encrypted here, and items carry what they have.
            "include" | "include[]" => {}
            _ => return Err(format!("{k}: not a query parameter of input_items (order, limit, after, before)")),
        }
    }
    let mut items = items;
    if order == "desc" {
        items.reverse();
    }
    let at = |id: &str| items.iter().position(|i| i["id"] == id).ok_or(format!("no input item {id} in this response"));
    let start = after.as_deref().map(at).transpose()?.map_or(0, |k| k + 1);
    let end = before.as_deref().map(at).transpose()?.unwrap_or(items.len());
    let window = items.get(start..end.max(start)).unwrap_or_default();
    let page: Vec<Value> = window.iter().take(limit).cloned().collect();
    Ok(json!({
        "object": "list",
        "data": page,
        "first_id": page.first().map(|i| i["id"].clone()),
        "last_id": page.last().map(|i| i["id"].clone()),
        "has_more": window.len() > page.len(),
    }))
}

/// A Responses request's body as a chat completions body: with `previous_response_id`, the
/// conversation `store` holds up to that response goes after the instructions, before the input.
pub fn chat_body(body: &[u8], store: &Store) -> Result<Turn, String> {
    let o = body_object(body, &FIELDS)?;
    let given = |k: &str| o.get(k).filter(|x| !x.is_null());
    let previous = match given("previous_response_id") {
        None => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(x) => return Err(format!("previous_response_id: {x} is not a response id")),
    };
    let earlier = previous.as_deref().map(|id| store.conversation(id)).transpose()?.unwrap_or_default();
    if let Some(t) = given("truncation").filter(|t| t.as_str() != Some("disabled")) {
        return Err(format!(
            "truncation: {t}: only \"disabled\" (a conversation longer than the model takes is refused)"
        ));
    }
    if let Some(b) = given("background").filter(|b| b.as_bool() != Some(false)) {
        return Err(format!("background: {b}: responses are answered as they run here (only false)"));
    }
    let mut chat = Map::new();
    if let Some(i) = given("include") {
        let list = i.as_array().ok_or_else(|| format!("include: {i} is not a list"))?;
        for x in list {
            match x.as_str() {
                Some("message.output_text.logprobs") => {
                    chat.insert("logprobs".into(), true.into());
                }
                // Reasoning is not encrypted here: its items carry their text.
                Some("reasoning.encrypted_content") => {}
                _ => {
                    return Err(format!(
                        "include: {x} is not supported (message.output_text.logprobs, reasoning.encrypted_content)"
                    ))
                }
            }
        }
    }
    let mut all = messages(given("instructions"), o.get("input"))?;
    let first = usize::from(given("instructions").is_some());
    let input = all[first..].to_vec();
    all.splice(first..first, earlier);
    chat.insert("messages".into(), all.into());
    for (ours, theirs) in [("max_completion_tokens", "max_output_tokens"), ("tool_choice", "tool_choice")] {
        if let Some(x) = given(theirs) {
            chat.insert(ours.into(), if ours == "tool_choice" { tool_choice(x)? } else { x.clone() });
        }
    }
    if let Some(tools) = given("tools") {
        chat.insert("tools".into(), function_tools(tools)?);
    }
    if let Some(format) = given("text").map(text_format).transpose()?.flatten() {
        chat.insert("response_format".into(), format);
    }
    if let Some(k) = given("top_logprobs") {
        chat.insert("logprobs".into(), true.into());
        chat.insert("top_logprobs".into(), k.clone());
    }
    let stream = pass_on(&o, &["model", "temperature", "top_p", "parallel_tool_calls", "user"], &mut chat)?;
    Ok(Turn { chat: chat.into(), stream, previous, input, items: input_items(o.get("input")) })
}

/// How many responses a server keeps for `previous_response_id` and `GET /v1/responses/ID` (the
/// oldest let go first).
pub const STORED: usize = 1024;

/// The most bytes the kept responses take (their turns' and objects' JSON): past it the oldest are
/// let go too (clients that send a whole conversation every turn keep it again in each).
pub const STORED_BYTES: usize = 64 << 20;

/// The responses kept (`store`, true unless a request says false): each one's id, the response
/// it continued, its turn as chat messages (its input's and its reply's) and the object answered.
#[derive(Default)]
pub struct Store {
    kept: std::sync::Mutex<std::collections::VecDeque<Stored>>,
}

struct Stored {
    id: String,
    previous: Option<String>,
    turn: Vec<Value>,
    object: Value,
    /// The request's input items, each with an id.
    items: Vec<Value>,
    bytes: usize,
}

impl Store {
    fn kept(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Stored>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps response `object` (its id inside), which continued `previous` with `turn`, asked with
    /// input `items` (those without an id given one: `item_` and the response's, then their place).
    pub fn keep(&self, object: &Value, previous: Option<String>, turn: Vec<Value>, items: Vec<Value>) {
        let id = object["id"].as_str().unwrap_or_default().to_string();
        let mut items = items;
        for (k, item) in items.iter_mut().enumerate() {
            if item.get("id").is_none_or(Value::is_null) {
                item["id"] = format!("item_{}_{k}", id.trim_start_matches("resp_")).into();
            }
        }
        let bytes = [object].into_iter().chain(&turn).chain(&items).map(|v| v.to_string().len()).sum::<usize>();
        let mut kept = self.kept();
        kept.push_back(Stored { id, previous, turn, object: object.clone(), items, bytes });
        while kept.len() > STORED || (kept.len() > 1 && kept.iter().map(|s| s.bytes).sum::<usize>() > STORED_BYTES) {
            kept.pop_front();
        }
    }

    /// The response object kept as `id`.
    pub fn get(&self, id: &str) -> Option<Value> {
        self.kept().iter().find(|s| s.id == id).map(|s| s.object.clone())
    }

    /// The input items of the response kept as `id`, in the order given.
    pub fn input_items(&self, id: &str) -> Option<Vec<Value>> {
        self.kept().iter().find(|s| s.id == id).map(|s| s.items.clone())
    }

    /// Lets response `id` go: whether it was kept.
    pub fn delete(&self, id: &str) -> bool {
        let mut kept = self.kept();
        let before = kept.len();
        kept.retain(|s| s.id != id);
        kept.len() < before
    }

    /// The conversation up to response `id`, as chat messages: each turn from the first on.
    pub fn conversation(&self, id: &str) -> Result<Vec<Value>, String> {
        let kept = self.kept();
        let mut turns = Vec::new();
        let mut at = Some(id.to_string());
        while let Some(id) = at {
            let s = kept.iter().find(|s| s.id == id).ok_or_else(|| {
                format!("previous_response_id: {id} is not a response kept here (the last {STORED} stored are)")
            })?;
            turns.push(s.turn.clone());
            at = s.previous.clone();
            if turns.len() > STORED {
                return Err(format!("previous_response_id: {id}: the responses before it loop"));
            }
        }
        Ok(turns.into_iter().rev().flatten().collect())
    }
}

/// A response's reply as the chat's assistant message: its message's text, its calls.
fn assistant_message(output: &[Value]) -> Value {
    let text: String = output
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().into_iter().flatten())
        .filter_map(|c| c["text"].as_str())
        .collect();
    let calls: Vec<Value> = output
        .iter()
        .filter(|i| i["type"] == "function_call")
        .map(|i| {
            json!({ "id": i["call_id"], "type": "function",
            "function": { "name": i["name"], "arguments": i["arguments"] } })
        })
        .collect();
    match calls.is_empty() {
        true => json!({ "role": "assistant", "content": text }),
        false => json!({ "role": "assistant", "content": if text.is_empty() { Value::Null } else { text.into() },
            "tool_calls": calls }),
    }
}

/// The id of request `number`'s response: unique to this server's run too (a response id from an
/// earlier run, whose store is gone, names none of this one's).
pub fn response_id(number: usize) -> String {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("{:x}", (nanos as u64) ^ (u64::from(std::process::id()) << 40))
    });
    format!("resp_{run}_{number}")
}

/// The chat's messages: `instructions` as a system message, then `input` (a text: one user
/// message; or a list of items).
fn messages(instructions: Option<&Value>, input: Option<&Value>) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    if let Some(i) = instructions {
        let text = i.as_str().ok_or_else(|| format!("instructions: {i} is not a text"))?;
        out.push(json!({ "role": "system", "content": text }));
    }
    let items = match input {
        None => return Err("no \"input\" (a text, or a list of items)".into()),
        Some(Value::String(text)) => return Ok([out, vec![json!({ "role": "user", "content": text })]].concat()),
        Some(Value::Array(items)) => items,
        Some(x) => return Err(format!("input: {x} is not a text or a list of items")),
    };
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let o = item.as_object().ok_or_else(|| format!("{at}: {item} is not an item"))?;
        let get = |k: &str| o.get(k).and_then(Value::as_str).ok_or_else(|| format!("{at}: no \"{k}\" text"));
        match o.get("type").and_then(Value::as_str).unwrap_or("message") {
            "message" => {
                let role = match get("role")? {
                    "developer" => "system",
                    r @ ("user" | "system" | "assistant") => r,
                    r => return Err(format!("{at}.role: {r} is not user, assistant, system or developer")),
                };
                let content = content_text(o.get("content"), &at)?;
                out.push(json!({ "role": role, "content": content }));
            }
            "function_call" => {
                let call = json!({ "id": get("call_id")?, "type": "function",
                    "function": { "name": get("name")?, "arguments": get("arguments")? } });
                // The calls of one turn: one assistant message, after its text if any.
                match out.last_mut() {
                    Some(m) if m["role"] == "assistant" => match m["tool_calls"].as_array_mut() {
                        Some(calls) => calls.push(call),
                        None => m["tool_calls"] = vec![call].into(),
                    },
                    _ => out.push(json!({ "role": "assistant", "content": null, "tool_calls": [call] })),
                }
            }
            "function_call_output" => {
                let output = match o.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(parts @ Value::Array(_)) => content_text(Some(parts), &format!("{at}.output"))?,
                    _ => return Err(format!("{at}: no \"output\" text")),
                };
                out.push(json!({ "role": "tool", "tool_call_id": get("call_id")?, "content": output }));
            }
            // The model's own reasoning: not shown to it again (as R1's template drops it).
            "reasoning" => {}
            t => {
                return Err(format!(
                "{at}: items of type {t} are not supported (message, function_call, function_call_output, reasoning)"
            ))
            }
        }
    }
    if out.iter().all(|m| m["role"] == "system") {
        return Err("input: no message to answer".into());
    }
    Ok(out)
}

/// A message's content: a text, or text parts (`input_text`, `output_text`) joined.
fn content_text(content: Option<&Value>, at: &str) -> Result<String, String> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (k, p) in parts.iter().enumerate() {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => text.push_str(t),
                    (Some(t), _) => {
                        return Err(format!("{at}.content[{k}]: parts of type {t} are not supported (text only)"))
                    }
                    _ => return Err(format!("{at}.content[{k}]: {p} is not a text part")),
                }
            }
            Ok(text)
        }
        _ => Err(format!("{at}: no \"content\" (a text, or text parts)")),
    }
}

/// The API's function tools (`{"type": "function", "name", "description", "parameters"}`) as
/// the chat's (the function's fields under `function`).
fn function_tools(tools: &Value) -> Result<Value, String> {
    let tools = tools.as_array().ok_or_else(|| format!("tools: {tools} is not a list"))?;
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| match t["type"].as_str() {
            Some("function") => {
                let mut f = t.as_object().cloned().unwrap_or_default();
                f.remove("type");
                Ok(json!({ "type": "function", "function": f }))
            }
            other => Err(format!(
                "tools[{i}]: type {} is not supported (function tools only)",
                other.map_or(t["type"].to_string(), str::to_string)
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::from)
}

/// `tool_choice`: `auto`, `none`, `required`, or `{"type": "function", "name"}`.
fn tool_choice(x: &Value) -> Result<Value, String> {
    match (x, x["type"].as_str(), x["name"].as_str()) {
        (Value::String(_), _, _) => Ok(x.clone()),
        (_, Some("function"), Some(name)) => Ok(json!({ "type": "function", "function": { "name": name } })),
        _ => Err(format!("tool_choice: {x} is not auto, none, required or {{\"type\": \"function\", \"name\": ...}}")),
    }
}

/// `text.format` as the chat's `response_format` (None: plain text).
fn text_format(text: &Value) -> Result<Option<Value>, String> {
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else { return Ok(None) };
    match format["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({ "type": "json_object" }))),
        Some("json_schema") => {
            let schema = format.get("schema").ok_or("text.format: json_schema needs a \"schema\"")?;
            Ok(Some(json!({ "type": "json_schema", "json_schema": { "name": format["name"], "schema": schema } })))
        }
        _ => Err(format!("text.format: {format} is not text, json_object or json_schema")),
    }
}

/// What one completion became, for its output items.
pub struct Outcome<'a> {
    /// The request's number (the items' ids).
    pub number: usize,
    /// Its reasoning's text (None: it did not reason, or it is not read for reasoning).
    pub reasoning: Option<&'a str>,
    /// Its answer's text (before its calls, where it called).
    pub text: &'a str,
    pub called: Option<&'a Called>,
}

pub fn reasoning_item(number: usize, text: &str, status: &str) -> Value {
    let content = if status == "in_progress" { json!([]) } else { json!([{ "type": "reasoning_text", "text": text }]) };
    json!({ "type": "reasoning", "id": format!("rs_{number}"), "summary": [], "content": content, "status": status })
}

pub fn message_item(number: usize, text: &str, status: &str) -> Value {
    let content = match status {
        "in_progress" => json!([]),
        _ => json!([{ "type": "output_text", "text": text, "annotations": [], "logprobs": [] }]),
    };
    json!({ "type": "message", "id": format!("msg_{number}"), "role": "assistant", "status": status, "content": content })
}

/// A call (`call_id`, the function `name`) as a `function_call` item.
pub fn call_item(call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({ "type": "function_call", "id": call_item_id(call_id), "call_id": call_id, "name": name,
        "arguments": arguments, "status": status })
}

/// The id of the item of call `call_id`.
pub fn call_item_id(call_id: &str) -> String {
    format!("fc_{}", call_id.trim_start_matches("call_"))
}

/// A completion's output items: its reasoning, its message (unless it only called), its calls.
pub fn items(o: &Outcome) -> Vec<Value> {
    let mut items = Vec::new();
    if let Some(r) = o.reasoning {
        items.push(reasoning_item(o.number, r, "completed"));
    }
    if !o.text.is_empty() || o.called.is_none() {
        items.push(message_item(o.number, o.text, "completed"));
    }
    for call in calls(o.called) {
        let (id, f) = (call["id"].as_str().unwrap_or_default(), &call["function"]);
        let (name, arguments) = (f["name"].as_str().unwrap_or_default(), f["arguments"].as_str().unwrap_or_default());
        items.push(call_item(id, name, arguments, "completed"));
    }
    items
}

/// The calls made, in order.
pub fn calls(called: Option<&Called>) -> &[Value] {
    called.and_then(|c| c.tool_calls.as_array()).map_or(&[], Vec::as_slice)
}

/// The response object: `status` (`in_progress`, `completed`, or `incomplete` when the token
/// budget ended it), the request's settings echoed, `output` and `usage` (null until known).
pub fn response(
    number: usize,
    created: u64,
    model: &str,
    request: &Value,
    status: &str,
    output: Vec<Value>,
    usage: Value,
) -> Value {
    let r = |k: &str, default: Value| request.get(k).filter(|x| !x.is_null()).cloned().unwrap_or(default);
    let incomplete = (status == "incomplete").then(|| json!({ "reason": "max_output_tokens" }));
    json!({
        "id": response_id(number),
        "object": "response",
        "created_at": created,
        "status": status,
        "error": null,
        "incomplete_details": incomplete,
        "model": model,
        "instructions": r("instructions", Value::Null),
        "max_output_tokens": r("max_output_tokens", Value::Null),
        "output": output,
        "parallel_tool_calls": r("parallel_tool_calls", true.into()),
        "previous_response_id": r("previous_response_id", Value::Null),
        "reasoning": r("reasoning", json!({ "effort": null, "summary": null })),
        "store": request.get("store").and_then(Value::as_bool).unwrap_or(true),
        "temperature": r("temperature", Value::Null),
        "text": r("text", json!({ "format": { "type": "text" } })),
        "tool_choice": r("tool_choice", "auto".into()),
        "tools": r("tools", json!([])),
        "top_p": r("top_p", Value::Null),
        "truncation": "disabled",
        "metadata": r("metadata", json!({})),
        "usage": usage,
        "user": r("user", Value::Null),
    })
}

/// The usage: the prompt's tokens (`cached`: those held from earlier requests' pages), the
/// completion's, of which `reasoning` reasoning.
pub fn usage(prompt: usize, cached: usize, output: usize, reasoning: usize) -> Value {
    json!({
        "input_tokens": prompt,
        "input_tokens_details": { "cached_tokens": cached },
        "output_tokens": output,
        "output_tokens_details": { "reasoning_tokens": reasoning },
        "total_tokens": prompt + output,
    })
}

/// Answers a `POST /v1/responses` on `conn` ([`crate::http`]'s server): the request as a chat
/// completion's (one choice), queued to the serving loop through `tx`, answered as a response
/// object, or streamed as the API's events.
pub(crate) fn answer(conn: &mut Conn, body: &[u8], tx: &ToLoop, site: &Site) {
    let model = site.model.as_str();
    let turn = chat_body(body, &site.responses);
    let (previous, input, given_items) = turn
        .as_ref()
        .map_or((None, Vec::new(), Vec::new()), |t| (t.previous.clone(), t.input.clone(), t.items.clone()));
    let (request, stream, t) = match one_chat(turn.map(|t| (t.chat, t.stream)), site) {
        Ok(r) => r,
        Err(e) => {
            let _ = respond_error(conn, "400 Bad Request", &e);
            return;
        }
    };
    // Kept, unless the request says not to, with the turn it continued.
    let keep = |object: &Value| {
        if object["store"] == true {
            let turn = [input.clone(), vec![assistant_message(object["output"].as_array().map_or(&[], Vec::as_slice))]];
            site.responses.keep(object, previous.clone(), turn.concat(), given_items.clone());
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
        if let Some(object) = stream_response(conn, &p, tx, site, t, &given, created) {
            keep(&object);
        }
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
    let object = response(p.number, created, model, &given, status, output, used);
    keep(&object);
    let _ = respond(conn, "200 OK", &object);
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
                let item = reasoning_item(self.number, "", "in_progress");
                let at = self.open(item, serde_json::json!({ "type": "reasoning_text", "text": "" }));
                *self.reasoning_at.insert(at)
            }
        }
    }

    fn message(&mut self) -> usize {
        match self.message_at {
            Some(at) => at,
            None => {
                let item = message_item(self.number, "", "in_progress");
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
        self.item_done(at, message_item(self.number, &text, "completed"));
    }

    /// Call `index`'s arguments and item done (`status`: `completed`, or `incomplete` where it
    /// was cut short).
    fn end_call(&mut self, index: usize, status: &str) {
        let Some((at, id, name, arguments, ended)) = self.calls.get_mut(index) else { return };
        if std::mem::replace(ended, true) {
            return;
        }
        let (at, item) = (*at, call_item(id, name, arguments, status));
        let done = serde_json::json!({ "item_id": item["id"], "output_index": at, "arguments": item["arguments"],
            "name": item["name"] });
        self.send("response.function_call_arguments.done", done);
        self.item_done(at, item);
    }
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
        self.item_done(at, reasoning_item(self.number, &text, "completed"));
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
                let added = call_item(id, name, "", "in_progress");
                self.send("response.output_item.added", serde_json::json!({ "output_index": at, "item": added }));
                self.calls.push((at, id.to_string(), name.clone(), String::new(), false));
            }
            CallEvent::Arguments { index, text } => {
                let Some((at, id, _, arguments, _)) = self.calls.get_mut(*index) else { return };
                arguments.push_str(text);
                let delta = serde_json::json!({ "item_id": call_item_id(id), "output_index": *at, "delta": text });
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

/// A response's events as its completion comes: `response.created` and `response.in_progress`,
/// then each output item added, its text (reasoning, then the message's) in deltas as it
/// settles and done, the calls each added with their arguments and done once the completion
/// ends, and `response.completed` (`response.incomplete` at the token budget) with the whole
/// response; a refused request ends it with an `error` event, a client that goes away cancels it.
/// The response when it ended.
fn stream_response(
    conn: &mut Conn,
    p: &Pending,
    tx: &ToLoop,
    site: &Site,
    t: &Arc<Tokenizer>,
    given: &serde_json::Value,
    created: u64,
) -> Option<Value> {
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
    let object =
        |status: &str, output: Vec<Value>, used: Value| response(number, created, model, given, status, output, used);
    let started = json!({ "response": object("in_progress", Vec::new(), Value::Null) });
    e.send("response.created", started.clone());
    e.send("response.in_progress", started);
    let Followed { g, reasoning, rest, .. } = follow(p, t, &mut e, tx)?;
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
    let done = object(status, output, used);
    e.send(&format!("response.{status}"), json!({ "response": done }));
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items become the chat's messages: instructions first, developer as system, text parts
    /// joined, a turn's calls one assistant message after its text, outputs as tool messages,
    /// reasoning dropped; tools, tool_choice and text.format as the chat's.
    #[test]
    fn requests_become_chat_bodies() {
        let body = json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 40, "temperature": 0.5, "seed": 3,
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                    {"type": "input_text", "text": "Paris?"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": "call_1_0", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "call_1_1", "name": "now", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1_0", "output": "sunny"},
                {"type": "function_call_output", "call_id": "call_1_1", "output": "noon"},
                {"type": "function_call", "call_id": "call_2_0", "name": "now", "arguments": "{}"},
            ],
            "tools": [{"type": "function", "name": "now", "parameters": {"type": "object", "properties": {}}}],
            "tool_choice": {"type": "function", "name": "now"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}},
            "top_k": 5,
        });
        let store = Store::default();
        let Turn { chat, stream, previous, input, .. } = chat_body(body.to_string().as_bytes(), &store).unwrap();
        assert!(!stream && previous.is_none());
        assert_eq!(input[0], json!({"role": "system", "content": "Use tools."}), "the instructions left out");
        let want = json!({
            "model": "m", "max_completion_tokens": 40, "temperature": 0.5, "seed": 3, "top_k": 5,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "system", "content": "Use tools."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "call_1_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_1_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1_0", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_1_1", "content": "noon"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_2_0", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
            ],
            "tools": [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}],
            "tool_choice": {"type": "function", "function": {"name": "now"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
        });
        assert_eq!(chat, want);
        // What Codex-style clients send along: taken, logprobs asked for through include.
        let body = br#"{"input": "Hi", "stream": true, "store": false, "prompt_cache_key": "k",
            "include": ["reasoning.encrypted_content", "message.output_text.logprobs"],
            "text": {"format": {"type": "text"}, "verbosity": "low"}}"#;
        assert_eq!(chat_body(body, &store).unwrap().chat["logprobs"], true);
        let turn = chat_body(br#"{"input": "Hi", "stream": true, "text": {"format": {"type": "text"}}}"#, &store);
        let Turn { chat, stream, .. } = turn.unwrap();
        assert!(stream);
        assert_eq!(chat, json!({"messages": [{"role": "user", "content": "Hi"}]}));
    }

    #[test]
    fn what_is_not_served_is_refused_by_name() {
        for (body, error) in [
            (
                r#"{"input": "x", "previous_response_id": "resp_1"}"#,
                "previous_response_id: resp_1 is not a response kept here (the last 1024 stored are)",
            ),
            (r#"{"input": "x", "previous_response_id": 7}"#, "previous_response_id: 7 is not a response id"),
            (r#"{"input": "x", "frobnicate": 1}"#, "unknown field 'frobnicate'"),
            (r#"{"input": "x", "response_format": {}}"#, "unknown field 'response_format'"),
            (r#"{}"#, "no \"input\""),
            (
                r#"{"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}"#,
                "input[0].content[0]: parts of type input_image are not supported (text only)",
            ),
            (
                r#"{"input": [{"type": "web_search_call"}]}"#,
                "input[0]: items of type web_search_call are not supported",
            ),
            (r#"{"input": [{"role": "robot", "content": "x"}]}"#, "input[0].role: robot is not"),
            (
                r#"{"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}"#,
                "input[0]: no \"call_id\" text",
            ),
            (r#"{"input": "x", "tools": [{"type": "web_search"}]}"#, "tools[0]: type web_search is not supported"),
            (r#"{"input": "x", "tool_choice": {"type": "function"}}"#, "tool_choice: "),
            (r#"{"input": "x", "text": {"format": {"type": "xml"}}}"#, "text.format: "),
            (r#"{"input": "x", "truncation": "auto"}"#, "truncation: \"auto\": only \"disabled\""),
            (
                r#"{"input": "x", "include": ["file_search_call.results"]}"#,
                "include: \"file_search_call.results\" is not supported",
            ),
            (r#"{"input": "x", "background": true}"#, "background: true: responses are answered as they run here"),
            (r#"{"input": [], "instructions": "x"}"#, "input: no message to answer"),
            (r#"{"input": "x", "stream": 1}"#, "stream: 1 is not true or false"),
        ] {
            let e = chat_body(body.as_bytes(), &Store::default()).unwrap_err();
            assert!(e.contains(error), "{body}: {e}");
        }
    }

    /// A conversation continued by `previous_response_id`: each stored turn (its input and its
    /// reply, calls included) in order after this request's instructions and before its input;
    /// the earlier instructions not carried on; a deleted or evicted response is named.
    #[test]
    fn stored_responses_continue_conversations() {
        let store = Store::default();
        let first = chat_body(br#"{"instructions": "Be brief.", "input": "Weather in Paris?"}"#, &store).unwrap();
        let call =
            json!({"type": "function_call", "call_id": "call_1_0", "name": "get", "arguments": "{}", "id": "fc_1_0"});
        let reply = json!({"id": "resp_x_1", "store": true, "output": [
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "hmm"}]},
            {"type": "message", "content": [{"type": "output_text", "text": "Checking."}]}, call]});
        store.keep(
            &reply,
            first.previous,
            [first.input, vec![assistant_message(reply["output"].as_array().unwrap())]].concat(),
            first.items,
        );
        let body = br#"{"instructions": "Be kind.", "previous_response_id": "resp_x_1",
            "input": [{"type": "function_call_output", "call_id": "call_1_0", "output": "sunny"}]}"#;
        let second = chat_body(body, &store).unwrap();
        assert_eq!(second.previous.as_deref(), Some("resp_x_1"));
        assert_eq!(
            second.chat["messages"],
            json!([
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "call_1_0", "type": "function", "function": {"name": "get", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1_0", "content": "sunny"},
            ])
        );
        // A third turn sees both before it.
        let answer = json!({"id": "resp_x_2", "output": [{"type": "message", "content": [{"type": "output_text", "text": "Sunny."}]}]});
        store.keep(
            &answer,
            second.previous,
            [second.input, vec![assistant_message(answer["output"].as_array().unwrap())]].concat(),
            second.items,
        );
        let third = chat_body(br#"{"previous_response_id": "resp_x_2", "input": "Thanks"}"#, &store).unwrap();
        let roles: Vec<&str> =
            third.chat["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["user", "assistant", "tool", "assistant", "user"]);
        assert_eq!(store.get("resp_x_2").unwrap()["id"], "resp_x_2");
        // Deleting the first breaks the chain through it.
        assert!(store.delete("resp_x_1") && !store.delete("resp_x_1"));
        let e = chat_body(br#"{"previous_response_id": "resp_x_2", "input": "x"}"#, &store).unwrap_err();
        assert!(e.contains("resp_x_1 is not a response kept here"), "{e}");
        // The oldest let go past STORED.
        for k in 0..STORED {
            store.keep(&json!({"id": format!("resp_y_{k}"), "output": []}), None, Vec::new(), Vec::new());
        }
        assert!(store.get("resp_x_2").is_none() && store.get("resp_y_0").is_some());
        // And past STORED_BYTES: a turn of a quarter of them keeps the last three or four.
        let big = vec![json!({"role": "user", "content": "x".repeat(STORED_BYTES / 4)})];
        for k in 0..6 {
            store.keep(&json!({"id": format!("resp_z_{k}"), "output": []}), None, big.clone(), Vec::new());
        }
        let left: Vec<bool> = (0..6).map(|k| store.get(&format!("resp_z_{k}")).is_some()).collect();
        assert_eq!(left, [false, false, false, true, true, true]);
        // Ids of another run name nothing of this one's.
        assert_ne!(response_id(3), "resp_3");
        assert!(response_id(3).starts_with("resp_") && response_id(3).ends_with("_3"));
    }

    /// A stored response's input items: a text as a user message, messages as message items of
    /// content parts, other items as given, each with an id (its own, or one given); listed last
    /// first by default, a page at a time through `limit`, `after` and `before`.
    #[test]
    fn input_items_are_listed_as_openai_lists_them() {
        let store = Store::default();
        let body = br#"{"input": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}], "id": "msg_a"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]}"#;
        let turn = chat_body(body, &store).unwrap();
        store.keep(&json!({"id": "resp_r_7", "output": []}), None, Vec::new(), turn.items);
        let items = store.input_items("resp_r_7").unwrap();
        assert_eq!(
            items,
            vec![
                json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}], "id": "item_r_7_0"}),
                json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}], "id": "item_r_7_1"}),
                json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}], "id": "msg_a"}),
                json!({"type": "function_call_output", "call_id": "c1", "output": "sunny", "id": "item_r_7_3"}),
            ]
        );
        let ids = |page: &Value| -> Vec<String> {
            page["data"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect()
        };
        let all = items_page(items.clone(), "").unwrap();
        assert_eq!(ids(&all), ["item_r_7_3", "msg_a", "item_r_7_1", "item_r_7_0"]);
        assert_eq!(
            (&all["object"], &all["first_id"], &all["last_id"], &all["has_more"]),
            (&json!("list"), &json!("item_r_7_3"), &json!("item_r_7_0"), &json!(false))
        );
        let first = items_page(items.clone(), "order=asc&limit=2").unwrap();
        assert_eq!(
            (ids(&first), &first["has_more"]),
            (vec!["item_r_7_0".to_string(), "item_r_7_1".into()], &json!(true))
        );
        let next = items_page(items.clone(), "order=asc&limit=2&after=item_r_7_1").unwrap();
        assert_eq!((ids(&next), &next["has_more"]), (vec!["msg_a".to_string(), "item_r_7_3".into()], &json!(false)));
        assert_eq!(ids(&items_page(items.clone(), "before=item_r_7_1").unwrap()), ["item_r_7_3", "msg_a"]);
        for (query, error) in [
            ("limit=0", "limit: 0 is not 1 to 100"),
            ("order=up", "order: up is not asc or desc"),
            ("after=nope", "no input item nope in this response"),
            ("page=2", "page: not a query parameter of input_items (order, limit, after, before)"),
        ] {
            assert_eq!(items_page(items.clone(), query).unwrap_err(), error);
        }
        assert!(store.input_items("resp_r_8").is_none());
        // A text input is one user message.
        let text = chat_body(br#"{"input": "Hi"}"#, &store).unwrap();
        assert_eq!(
            text.items,
            vec![json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]})]
        );
    }

    /// Output items: reasoning, then the message (left out when the reply only called), then a
    /// function_call item a call, their ids from the request's number and the calls' ids.
    #[test]
    fn completions_become_output_items() {
        let called = Called {
            content: String::new(),
            tool_calls: json!([{"id": "call_4_0", "type": "function", "function": {"name": "now", "arguments": "{}"}}]),
        };
        let only_calls = items(&Outcome { number: 4, reasoning: Some("hmm"), text: "", called: Some(&called) });
        let types: Vec<&str> = only_calls.iter().map(|i| i["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["reasoning", "function_call"]);
        assert_eq!(only_calls[0]["content"][0]["text"], "hmm");
        assert_eq!(
            only_calls[1],
            json!({"type": "function_call", "id": "fc_4_0", "call_id": "call_4_0", "name": "now", "arguments": "{}",
                "status": "completed"})
        );
        let plain = items(&Outcome { number: 5, reasoning: None, text: "", called: None });
        assert_eq!(plain, vec![message_item(5, "", "completed")]);
        assert_eq!(plain[0]["content"][0]["type"], "output_text");
        let r = response(5, 1, "m", &json!({"max_output_tokens": 9}), "incomplete", plain, usage(3, 0, 9, 0));
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!((r["id"].as_str(), r["max_output_tokens"].as_u64()), (Some(&response_id(5)[..]), Some(9)));
        assert_eq!((&r["store"], &r["previous_response_id"]), (&json!(true), &Value::Null));
        assert_eq!(r["usage"]["total_tokens"], 12);
    }
}
