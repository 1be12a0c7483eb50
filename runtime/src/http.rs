//! `v3r serve --http ADDR`: the serving loop ([`crate::session::serve`]) behind a small HTTP/1.1
//! server speaking OpenAI's API (each API's bodies and replies in a module of its own: [`crate::openai`],
//! [`crate::responses`], [`crate::messages`]; here the server, its routes, and what they share):
//! - `POST /v1/completions`: `{"prompt": "text" or [ids] (or an array of prompts), "n": choices,
//!   "max_tokens": N, "temperature": T, "top_p": P, "seed": S, "stop": ["text", ...] or [[ids], ...],
//!   "logprobs": true or K, "echo": true, "stream": true}`;
//! - `POST /v1/chat/completions`: `{"messages": [...], ...}`, written by the tokenizer's chat template;
//!   with `"tools": [...]`, the functions the model may call ([`crate::tools`]), its calls in the
//!   message's `tool_calls`;
//! - `POST /v1/responses`: OpenAI's Responses API over the chat path ([`crate::responses`]):
//!   `input` items in, output items (reasoning, message, function calls) out, or its events;
//!   responses kept (`previous_response_id`; `GET` and `DELETE /v1/responses/ID`);
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
use crate::openai::{api_request, called, chat_token, finish_reason, Api, Called};
use crate::route::{RouteEnd, Routed, Router, Scored};
use crate::session::{generation_text, Arrival, Generation, Progress, Request};
use crate::tokenizer::Tokenizer;

/// The most connections open at once (a thread each); more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 1024;

/// The most bytes of a request line and its headers (a client cannot make a connection hold more).
const MAX_HEAD: usize = 64 << 10;

/// The largest request body read (a prompt of a million token ids fits).
const MAX_BODY: usize = 16 << 20;

/// A parsed HTTP request: its method, path and body.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    /// What followed the path's `?` (empty: nothing).
    pub query: String,
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
    read_request_with(reader, &mut || Ok(()))
}

/// [`read_request`], with `go_on` called before a body is read that the client waits to send until
/// it is told to (`Expect: 100-continue`, as curl sends bodies over 1 KiB: told nothing, it waits a
/// second).
pub fn read_request_with(
    reader: &mut impl BufRead,
    go_on: &mut dyn FnMut() -> std::io::Result<()>,
) -> Result<Option<HttpRequest>, String> {
    // What of the request line and headers may still be read: a line is read at most that far.
    let mut room = MAX_HEAD;
    let mut read_line = |reader: &mut dyn BufRead, line: &mut String| -> std::io::Result<usize> {
        let n = std::io::Read::take(&mut *reader, room as u64).read_line(line)?;
        room -= n;
        if room == 0 && !line.ends_with('\n') {
            return Err(std::io::Error::other(format!("the request line and headers exceed {MAX_HEAD} bytes")));
        }
        Ok(n)
    };
    let mut line = String::new();
    match read_line(reader, &mut line) {
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
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let (method, path, query) = (method.to_string(), path.to_string(), query.to_string());
    let (mut length, mut authorization) = (0usize, None);
    let mut keep_alive = version == "HTTP/1.1";
    let (mut expects, mut chunked) = (false, false);
    loop {
        let mut header = String::new();
        if read_line(reader, &mut header).map_err(|e| format!("reading the headers: {e}"))? == 0 {
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
            } else if name.trim().eq_ignore_ascii_case("expect") {
                expects = value.trim().eq_ignore_ascii_case("100-continue");
            } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                match value.trim().to_ascii_lowercase().as_str() {
                    "chunked" => chunked = true,
                    other => return Err(format!("Transfer-Encoding: {other}: only chunked (or a Content-Length)")),
                }
            }
        }
    }
    if length > MAX_BODY {
        return Err(format!("a body of {length} bytes (at most {MAX_BODY})"));
    }
    if expects && (length > 0 || chunked) {
        go_on().map_err(|e| format!("telling the client to go on: {e}"))?;
    }
    let body = if chunked {
        read_chunks(reader)?
    } else {
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).map_err(|e| format!("reading a body of {length} bytes: {e}"))?;
        body
    };
    Ok(Some(HttpRequest { method, path, query, body, authorization, keep_alive }))
}

/// A chunked body (RFC 9112 7.1): chunks of a hex size line (extensions after `;` left out), the
/// bytes and a line end, up to one of size zero, then trailer lines (left out) up to a blank one;
/// at most [`MAX_BODY`] bytes in all.
fn read_chunks(reader: &mut impl BufRead) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let mut line = String::new();
    let read_line = |reader: &mut dyn BufRead, line: &mut String| -> Result<(), String> {
        line.clear();
        match std::io::Read::take(&mut *reader, 4096).read_line(line) {
            Ok(0) => Err("the chunked body ends before its last chunk".to_string()),
            Ok(_) if !line.ends_with('\n') => Err("a chunk's size line past 4096 bytes".to_string()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("reading a chunked body: {e}")),
        }
    };
    loop {
        read_line(reader, &mut line)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let n = usize::from_str_radix(size, 16).map_err(|_| format!("a chunk's size: {size:?} is not hex"))?;
        if n == 0 {
            break;
        }
        // (`n` may be up to 2^64 - 1: compared with what is left, not added.)
        if n > MAX_BODY - body.len() {
            return Err(format!("a chunked body past {MAX_BODY} bytes"));
        }
        let start = body.len();
        body.resize(start + n, 0);
        reader.read_exact(&mut body[start..]).map_err(|e| format!("reading a chunk of {n} bytes: {e}"))?;
        read_line(reader, &mut line)?;
        if !line.trim_end_matches(['\r', '\n']).is_empty() {
            return Err(format!("a chunk of {n} bytes not followed by a line end"));
        }
    }
    // Trailers, up to the blank line.
    loop {
        read_line(reader, &mut line)?;
        if line.trim_end_matches(['\r', '\n']).is_empty() {
            return Ok(body);
        }
    }
}

/// Writes a whole response: `status` (e.g. "200 OK") and a JSON body.
pub(crate) fn respond(conn: &mut Conn, status: &str, body: &serde_json::Value) -> std::io::Result<()> {
    respond_text(conn, status, "application/json", &body.to_string())
}

/// Writes a whole response of `content_type`, the connection kept open or closed as `conn` says.
fn respond_text(conn: &mut Conn, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let connection = if conn.keep { "keep-alive" } else { "close" };
    // One write: the reply's pieces need not go out as segments of their own.
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n{CORS}\r\n{body}",
        body.len()
    );
    conn.stream.write_all(reply.as_bytes())?;
    conn.stream.flush()
}

/// An error response in OpenAI's shape.
pub(crate) fn respond_error(conn: &mut Conn, status: &str, message: &str) -> std::io::Result<()> {
    let kind = if status.starts_with('4') { "invalid_request_error" } else { "server_error" };
    respond(conn, status, &serde_json::json!({ "error": { "message": message, "type": kind } }))
}

/// A client's connection, and whether it stays open after the reply being written.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) keep: bool,
}

/// A connection's way to the serving loop: a message, and where (for a request) its number goes.
pub(crate) type ToLoop = mpsc::Sender<(Message, Option<mpsc::Sender<usize>>)>;

/// What a connection's thread hands the serving loop.
pub(crate) enum Message {
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
    /// The Responses API's stored responses ([`crate::responses::Store`]).
    pub responses: crate::responses::Store,
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
    /// Speculative: the MTP drafts of the requests ended (None: none was speculative).
    speculated: Option<crate::session::Speculated>,
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
            if let Some(d) = g.speculation {
                self.speculated = Some(self.speculated.unwrap_or_default() + d);
            }
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
            ("v3r_decode_steps_total", "counter", "Decode steps of the batch.", self.load.decode_steps as u64),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        }
        let rows = "Rows the decode steps ran: every slot's, or (over a pool of pages) the decoding sequences' \
                    and as few idle ones as make a power of two; `fed`, those of sequences fed a token.";
        out.push_str(&format!("# HELP v3r_decode_rows_total {rows}\n# TYPE v3r_decode_rows_total counter\n"));
        for (which, n) in [("run", self.load.rows_run), ("fed", self.load.rows_fed)] {
            out.push_str(&format!("v3r_decode_rows_total{{rows=\"{which}\"}} {n}\n"));
        }
        if let Some(d) = self.speculated {
            for (name, help, value) in [
                ("v3r_spec_decode_draft_tokens_total", "MTP drafts verified by the main model.", d.drafted),
                ("v3r_spec_decode_accepted_tokens_total", "MTP drafts the main model accepted.", d.accepted),
                ("v3r_spec_decode_passes_total", "Passes of the main model verifying drafts.", d.passes),
            ] {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"));
            }
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

/// Takes `listener`'s connections, each served by a thread of its own ([`connection`]), at most
/// `cap` at once: past it a connection is answered 503 and closed.
fn accept(listener: TcpListener, cap: usize, tx: ToLoop, site: Arc<Site>) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    /// One open connection, counted until its thread ends (however it ends).
    struct Open(Arc<AtomicUsize>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, SeqCst);
        }
    }
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming().flatten() {
        if open.load(SeqCst) >= cap {
            let mut conn = Conn { stream, keep: false };
            let busy = format!("{cap} connections are open: try again later");
            let _ = respond_error(&mut conn, "503 Service Unavailable", &busy);
            std::thread::spawn(move || linger(conn.stream));
            continue;
        }
        open.fetch_add(1, SeqCst);
        let (tx, site, held) = (tx.clone(), site.clone(), Open(open.clone()));
        std::thread::spawn(move || {
            let _held = held;
            connection(stream, tx, &site);
        });
    }
}

/// Closes a connection answered before its request was read: the request is read (and dropped)
/// first, for a while. Closing with bytes unread sends a reset, which can reach the client before
/// it has read the reply, and take the reply with it.
fn linger(mut stream: TcpStream) {
    use std::io::Read;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(500)));
    let (mut sink, mut read) = ([0u8; 4096], 0);
    while let Ok(n @ 1..) = stream.read(&mut sink) {
        read += n;
        if read > 1 << 16 {
            break;
        }
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
    std::thread::spawn(move || accept(listener, MAX_CONNECTIONS, accepting, site));
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
    let crate::session::ServeRun { joined, prefill_s, .. } =
        crate::session::serve(program, &o, &mut next, &mut report)?;
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
pub(crate) const STOPPING: &str = "the server is stopping";

/// Seconds since the Unix epoch (`created`).
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One connection: its requests read, routed, answered, one after another while the client
/// keeps it open (a streamed reply closes it).
fn connection(stream: TcpStream, tx: ToLoop, site: &Site) {
    // A client that never finishes a request, or idles, does not hold its thread for ever.
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(60)));
    let Ok(reading) = stream.try_clone() else { return };
    let mut reader = BufReader::new(reading);
    let mut conn = Conn { stream, keep: false };
    loop {
        let go_on = &mut || {
            conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            conn.stream.flush()
        };
        let request = match read_request_with(&mut reader, go_on) {
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
fn answer(conn: &mut Conn, request: &HttpRequest, tx: &ToLoop, site: &Site) {
    let model = site.model.as_str();
    let authorized = match &site.api_key {
        None => true,
        Some(key) => request.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).is_some_and(|given| {
            // Compared in time independent of where they differ.
            given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
        }),
    };
    if request.method == "OPTIONS" {
        // A browser's preflight before a cross-origin request: what it may send, no key needed.
        let preflight = "HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: *\r\nAccess-Control-Allow-Methods: \
                         GET, POST, DELETE, OPTIONS\r\nAccess-Control-Allow-Headers: Authorization, Content-Type, \
                         X-Api-Key, Anthropic-Version, *\r\nAccess-Control-Max-Age: 600\r\nContent-Length: 0\r\n";
        let connection = if conn.keep { "keep-alive" } else { "close" };
        let _ = write!(conn.stream, "{preflight}Connection: {connection}\r\n\r\n").and_then(|_| conn.stream.flush());
        return;
    }
    if !authorized && request.path != "/health" && request.path != "/metrics" {
        let message = "a valid API key is needed: Authorization: Bearer KEY (v3r serve --api-key)";
        let body = serde_json::json!({ "error": { "message": message, "type": "invalid_request_error", "code": "invalid_api_key" } });
        let _ = respond(conn, "401 Unauthorized", &body);
        return;
    }
    if let Some(other) = other_model(request, model) {
        // As vLLM and OpenAI answer: a request meant for another model is not served by this one.
        let message = format!("the model '{other}' is not served here: '{model}' is (v3r serve --served-model-name)");
        let body = if request.path.starts_with("/v1/messages") {
            crate::messages::error("not_found_error", &message)
        } else {
            serde_json::json!({ "error": { "message": message, "type": "invalid_request_error", "code": "model_not_found" } })
        };
        let _ = respond(conn, "404 Not Found", &body);
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
        ("POST", "/v1/completions") => crate::openai::answer(Api::Completions, conn, &request.body, tx, site),
        ("POST", "/v1/chat/completions") => crate::openai::answer(Api::Chat, conn, &request.body, tx, site),
        ("POST", "/v1/responses") => crate::responses::answer(conn, &request.body, tx, site),
        ("GET", path) if path.starts_with("/v1/responses/") && path.ends_with("/input_items") => {
            // A stored response's input items (OpenAI's `input_items.list`), a page at a time.
            let id = path.trim_start_matches("/v1/responses/").trim_end_matches("/input_items");
            let _ = match site.responses.input_items(id) {
                None => respond_error(conn, "404 Not Found", &format!("no response {id} is kept here")),
                Some(items) => match crate::responses::items_page(items, &request.query) {
                    Ok(page) => respond(conn, "200 OK", &page),
                    Err(e) => respond_error(conn, "400 Bad Request", &e),
                },
            };
        }
        (method @ ("GET" | "DELETE"), path) if path.starts_with("/v1/responses/") => {
            // A stored response (OpenAI's `retrieve` and `delete`).
            let id = path.trim_start_matches("/v1/responses/");
            let _ = match (method, site.responses.get(id)) {
                ("GET", Some(object)) => respond(conn, "200 OK", &object),
                ("DELETE", Some(_)) if site.responses.delete(id) => respond(
                    conn,
                    "200 OK",
                    &serde_json::json!({ "id": id, "object": "response.deleted", "deleted": true }),
                ),
                _ => respond_error(conn, "404 Not Found", &format!("no response {id} is kept here")),
            };
        }
        ("POST", "/v1/messages") => crate::messages::answer(conn, &request.body, tx, site),
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
                "{path}: served are POST /v1/completions, POST /v1/chat/completions, POST /v1/responses (GET and \
                 DELETE /v1/responses/ID, GET /v1/responses/ID/input_items), POST /v1/messages (and /v1/messages/count_tokens), POST /tokenize, POST /detokenize, GET /v1/models, GET \
                 /health and GET /metrics"
            );
            let _ = respond_error(conn, "404 Not Found", &message);
        }
    }
}

/// The model a POST's JSON body names, where it names one other than `served` (a body that is not
/// JSON is left to the API's own reading to refuse).
fn other_model(request: &HttpRequest, served: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<serde_json::Value>,
    }
    if request.method != "POST" {
        return None;
    }
    match serde_json::from_slice::<Named>(&request.body).ok()?.model? {
        serde_json::Value::String(name) if name == served => None,
        serde_json::Value::String(name) => Some(name),
        _ => None,
    }
}

/// The served model, as `GET /v1/models` lists it.
fn model_object(site: &Site) -> serde_json::Value {
    serde_json::json!({ "id": site.model, "object": "model", "created": 0, "owned_by": "v3c",
        "max_model_len": site.max_len })
}

/// What `POST /tokenize` reads: text (`prompt`) or a chat (`messages`, with what the template is
/// given beside them), as vLLM's.
const TOKENIZE_FIELDS: [&str; 8] = [
    "prompt",
    "messages",
    "tools",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "model",
];

/// vLLM's `POST /tokenize` (`{"prompt": "text"}` or `{"messages": [...]}` through the chat
/// template — with `tools`, `chat_template_kwargs` and `add_generation_prompt`, true unless said
/// — `add_special_tokens` true by default: `{"tokens", "count", "max_model_len"}`) and
/// `POST /detokenize` (`{"tokens": [ids]}`: `{"prompt": text}`).
fn tokenize(encode: bool, body: &[u8], site: &Site) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not a JSON body: {e}"))?;
    let o = v.as_object().ok_or("the body is not a JSON object")?;
    let fields: &[&str] = if encode { &TOKENIZE_FIELDS } else { &["tokens", "model"] };
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
        (None, Some(_)) if t.has_chat_template() => t.encode(&t.render_conversation(&v)?, false),
        (None, Some(_)) => return Err("messages: the tokenizer has no chat template".into()),
        (Some(_), Some(_)) => return Err("\"prompt\" and \"messages\": one of them".into()),
        (Some(x), None) => return Err(format!("prompt: {x} is not a string")),
        (None, None) => return Err("no \"prompt\" (text) or \"messages\"".into()),
    };
    Ok(serde_json::json!({ "tokens": tokens, "count": tokens.len(), "max_model_len": site.max_len }))
}

/// What a connection knows of one of its requests: its prompt, whether it is echoed, its stop
/// strings, and where its progress comes.
pub(crate) struct Pending {
    pub(crate) number: usize,
    pub(crate) prompt: Vec<u32>,
    pub(crate) echoed: bool,
    pub(crate) stops: Option<crate::session::TextStops>,
    pub(crate) events: mpsc::Receiver<Progress>,
    /// The functions it may call (read for calls when it ends).
    pub(crate) tools: Option<Arc<crate::tools::Tools>>,
    /// How its completion parts into reasoning and answer.
    pub(crate) reasoning: Option<crate::reasoning::Reasoning>,
}

/// A chat reply's parts, whole: its reasoning (tokens and text; None: it did not reason, or is
/// not read for reasoning), its answer's tokens, its text (cut before a stop string; where it
/// called, the text before the calls) and its calls.
pub(crate) struct Whole {
    pub(crate) reasoning: Option<Vec<u32>>,
    pub(crate) thought: Option<String>,
    pub(crate) answer: Vec<u32>,
    pub(crate) text: String,
    pub(crate) called: Option<Called>,
}

impl Pending {
    /// Its reply `g`'s parts, through `t`.
    pub(crate) fn whole(&self, g: &Generation, t: &Tokenizer) -> Whole {
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
    pub(crate) fn split(&self, g: &Generation) -> (Option<Vec<u32>>, Vec<u32>) {
        match self.reasoning {
            Some(r) => r.split(&g.tokens),
            None => (None, g.tokens.clone()),
        }
    }
}

/// Queues `request` into the batch (`api`'s: echoed only by completions): what the connection
/// keeps of it (None: the server is stopping).
pub(crate) fn queue(api: Api, request: Request, tx: &ToLoop) -> Option<Pending> {
    let (prompt, echoed) = (request.prompt.clone(), request.echo && api == Api::Completions);
    let (stops, tools, reasoning) = (request.stop_text.clone(), request.tools.clone(), request.reasoning);
    let (progress, events) = mpsc::channel();
    let (number_tx, number_rx) = mpsc::channel();
    tx.send((Message::Request(Box::new(request), progress), Some(number_tx))).ok()?;
    let number = number_rx.recv().ok()?;
    Some(Pending { number, prompt, echoed, stops, events, tools, reasoning })
}

/// `p`'s end: its generation, or the status and message of why there is none.
pub(crate) fn wait(p: &Pending) -> Result<Generation, (&'static str, String)> {
    let outcome = p.events.iter().find_map(|event| match event {
        Progress::Token(_) | Progress::Scored(..) => None,
        Progress::Ended(g) | Progress::Cancelled(g) => Some(Ok(g)),
        Progress::Refused(e) if e == STOPPING => Some(Err(("503 Service Unavailable", e))),
        Progress::Refused(e) => Some(Err(("400 Bad Request", e))),
    });
    outcome.unwrap_or_else(|| Err(("503 Service Unavailable", "the server stopped before the request ended".into())))
}

/// Another API's request as a chat completion's body (`chat`: it, and whether the reply
/// streams): the one request it makes, whether it streams, and the tokenizer a chat needs.
pub(crate) fn one_chat(
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

/// Where a streamed reply's text goes as it settles: its reasoning's, then its answer's.
pub(crate) trait Sink {
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

/// How a streamed reply ended: its generation, its reasoning's tokens (None: it did not reason),
/// its calls, and its answer's last text (none where it called).
pub(crate) struct Followed {
    pub(crate) g: Generation,
    pub(crate) reasoning: Option<Vec<u32>>,
    pub(crate) called: Option<Called>,
    pub(crate) rest: String,
}

/// The id of call `index` of request `number` (as [`crate::tools::calls_json`] names it).
pub(crate) fn call_id(number: usize, index: usize) -> String {
    format!("call_{number}_{index}")
}

/// A chat reply's tokens as they come, routed ([`Router`]) to `sink`; None where it did not end
/// (refused: said to the sink; the client gone: cancelled).
pub(crate) fn follow(p: &Pending, t: &Arc<Tokenizer>, sink: &mut impl Sink, tx: &ToLoop) -> Option<Followed> {
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

/// The head of a reply of server-sent events.
pub(crate) const EVENT_STREAM: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: \
     no-cache\r\nConnection: close\r\nAccess-Control-Allow-Origin: *\r\n\r\n";

/// What every reply says for browsers' cross-origin requests: any origin may read it (as vLLM's
/// server says by default; no cookies are read here, an API key goes in a header).
const CORS: &str = "Access-Control-Allow-Origin: *\r\n";

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
        assert!(!m.render().contains("spec_decode"), "speculative counters of a server that is not");
        let drafts = crate::session::Speculated { drafted: 5, accepted: 3, passes: 4 };
        let s = Generation { speculation: Some(drafts), ..Generation::alone(vec![1], false, 0.0, 0.0) };
        for _ in 0..2 {
            m.arrived(0);
            m.ended(1, 0.0, Some(&s));
        }
        m.ended(3, 0.0, None);
        m.load = crate::session::Load {
            running: 2,
            waiting: 5,
            cache_usage: 0.25,
            decode_steps: 7,
            rows_run: 12,
            rows_fed: 9,
        };
        let text = m.render();
        for line in [
            "v3r_decode_steps_total 7",
            "v3r_decode_rows_total{rows=\"run\"} 12",
            "v3r_decode_rows_total{rows=\"fed\"} 9",
            "# TYPE v3r_decode_rows_total counter",
            "v3r_requests_running 2",
            "v3r_requests_waiting 5",
            "v3r_kv_cache_usage_ratio 0.25",
            "v3r_requests_total{finish=\"length\"} 3",
            "v3r_requests_total{finish=\"refused\"} 1",
            "v3r_requests_total{finish=\"stop\"} 0",
            "v3r_requests_in_flight 1",
            "v3r_prompt_tokens_total 13",
            "v3r_cached_prompt_tokens_total 64",
            "v3r_generation_tokens_total 5",
            "v3r_spec_decode_draft_tokens_total 10",
            "v3r_spec_decode_accepted_tokens_total 6",
            "v3r_spec_decode_passes_total 8",
            "v3r_time_to_first_token_seconds_bucket{le=\"0.01\"} 0",
            "v3r_time_to_first_token_seconds_bucket{le=\"0.025\"} 1",
            "v3r_time_to_first_token_seconds_bucket{le=\"5\"} 2",
            "v3r_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2",
            "v3r_time_to_first_token_seconds_sum 3.02",
            "v3r_request_latency_seconds_count 3",
            "# TYPE v3r_request_latency_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    /// A request line and headers past [`MAX_HEAD`] bytes are refused (a client cannot make the
    /// server hold a line without end); any bytes are read or refused, never a panic.
    #[test]
    fn heads_are_read_up_to_their_limit() {
        let long = format!("GET /health HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let got = read_request(&mut long.as_bytes()).unwrap_err();
        assert!(got.contains("exceed 65536 bytes"), "{got}");
        let endless = format!("GET /{} HTTP/1.1", "a".repeat(3 * MAX_HEAD));
        assert!(read_request(&mut endless.as_bytes()).unwrap_err().contains("exceed"));
        // Many short headers add up too.
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(MAX_HEAD / 6 + 1));
        assert!(read_request(&mut many.as_bytes()).unwrap_err().contains("exceed"));
        let fits = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(MAX_HEAD - 64));
        assert_eq!(read_request(&mut fits.as_bytes()).unwrap().unwrap().path, "/");
    }

    /// A chunk size near 2^64 after a first chunk is refused; the size and the bytes read so far
    /// were added, which wrapped past the limit's check and panicked slicing the body.
    #[test]
    fn chunk_sizes_past_the_limit_are_refused() {
        for size in ["ffffffffffffffff", "fffffffffffffffe", "1000000"] {
            let raw =
                format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n{size}\r\nb\r\n0\r\n\r\n");
            let got = read_request(&mut raw.as_bytes()).unwrap_err();
            assert_eq!(got, format!("a chunked body past {MAX_BODY} bytes"), "{size}");
        }
    }

    proptest::proptest! {
        /// A body sent in chunks of any sizes (with extensions and trailers) is read as the same
        /// body sent whole, and the next request after it read as well.
        #[test]
        fn chunked_bodies_are_the_bodies_sent_whole(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
                                                    cuts in proptest::collection::vec(0usize..200, 0..6)) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.extend([0, body.len()]);
            cuts.sort_unstable();
            let mut raw = b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n".to_vec();
            for (k, w) in cuts.windows(2).enumerate().filter(|(_, w)| w[1] > w[0]) {
                let ext = if k % 2 == 1 { ";name=value" } else { "" };
                raw.extend(format!("{:x}{ext}\r\n", w[1] - w[0]).bytes());
                raw.extend(&body[w[0]..w[1]]);
                raw.extend(b"\r\n");
            }
            raw.extend(b"0\r\nX-Trailer: t\r\n\r\nGET /health HTTP/1.1\r\n\r\n");
            let mut reader = raw.as_slice();
            let r = read_request(&mut reader).unwrap().unwrap();
            proptest::prop_assert_eq!(r.body, body);
            proptest::prop_assert_eq!(read_request(&mut reader).unwrap().unwrap().path, "/health");
        }

        #[test]
        fn any_bytes_are_a_request_or_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                                              head in "(GET|POST) /[a-z/]{0,12} HTTP/1\\.[01]\r\n([A-Za-z-]{1,14}: ?[ -~]{0,12}\r\n){0,4}") {
            let _ = read_request(&mut bytes.as_slice());
            let _ = read_request(&mut [head.as_bytes(), &bytes].concat().as_slice());
        }
    }

    /// A server on a free port taking at most `cap` connections (no serving loop behind it: what
    /// reaches the loop is never answered), and its address.
    fn bare_server(cap: usize) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        let site = Site {
            defaults: RequestDefaults::for_tests(),
            tokenizer: None,
            model: "m".into(),
            api_key: None,
            max_len: 8,
            metrics: Default::default(),
            responses: Default::default(),
        };
        std::thread::spawn(move || {
            let _rx = rx;
            accept(listener, cap, tx, Arc::new(site))
        });
        addr
    }

    /// A client that waits to send its body (`Expect: 100-continue`, as curl does past 1 KiB) is
    /// told to go on at once, and answered once it has.
    #[test]
    fn clients_that_expect_100_continue_are_told_to_go_on() {
        use std::io::Read;
        let mut s = TcpStream::connect(bare_server(4)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let body = r#"{"prompt": "x"}"#;
        let head = format!("POST /tokenize HTTP/1.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n", body.len());
        s.write_all(head.as_bytes()).unwrap();
        let mut got = [0u8; 25];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(body.as_bytes()).unwrap();
        let mut reply = String::new();
        let mut buf = [0u8; 4096];
        while !reply.contains("no tokenizer") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "{reply}");
            reply.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    }

    /// Browsers' cross-origin requests: a preflight (OPTIONS, no key) says what may be sent, and
    /// replies say any origin may read them.
    #[test]
    fn browsers_may_call_from_other_origins() {
        use std::io::Read;
        let exchange = |raw: &str| {
            let mut s = TcpStream::connect(bare_server(4)).unwrap();
            s.write_all(raw.as_bytes()).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        };
        let preflight = exchange(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nOrigin: http://a.example\r\nAccess-Control-Request-Method: \
             POST\r\nConnection: close\r\n\r\n",
        );
        assert!(preflight.starts_with("HTTP/1.1 204 No Content\r\n"), "{preflight}");
        for header in ["Access-Control-Allow-Origin: *", "Access-Control-Allow-Methods: GET, POST, DELETE, OPTIONS"] {
            assert!(preflight.contains(header), "{preflight}");
        }
        assert!(preflight.contains("Access-Control-Allow-Headers: Authorization, Content-Type"), "{preflight}");
        let health = exchange("GET /health HTTP/1.1\r\nOrigin: http://a.example\r\nConnection: close\r\n\r\n");
        assert!(health.starts_with("HTTP/1.1 200 OK") && health.contains("Access-Control-Allow-Origin: *"), "{health}");
    }

    /// A request naming another model is answered 404 in its API's shape; naming this one, or
    /// none, it goes on (here to /tokenize's refusal: the bare server has no tokenizer).
    #[test]
    fn requests_for_another_model_are_not_found() {
        use std::io::Read;
        let addr = bare_server(4);
        let post = |path: &str, body: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            let head = format!("POST {path} HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            s.write_all([head.as_bytes(), body.as_bytes()].concat().as_slice()).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            let (status, body) = reply.split_once("\r\n\r\n").unwrap();
            (status.lines().next().unwrap().to_string(), serde_json::from_str::<serde_json::Value>(body).unwrap())
        };
        let message = "the model 'gpt-4o' is not served here: 'm' is (v3r serve --served-model-name)";
        let (status, body) = post("/v1/chat/completions", r#"{"model": "gpt-4o", "messages": []}"#);
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        assert_eq!(body["error"]["message"], message);
        assert_eq!(body["error"]["code"], "model_not_found");
        let (status, body) = post("/v1/messages", r#"{"model": "gpt-4o", "max_tokens": 1, "messages": []}"#);
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        assert_eq!((&body["type"], &body["error"]["type"]), (&"error".into(), &"not_found_error".into()));
        for named in [r#"{"model": "m", "prompt": "x"}"#, r#"{"prompt": "x"}"#, r#"{"model": null, "prompt": "x"}"#] {
            let (status, body) = post("/tokenize", named);
            assert_eq!(status, "HTTP/1.1 400 Bad Request", "{named}: {body}");
        }
    }

    /// Past `cap` open connections, one more is answered 503 and closed; once one closes, the
    /// next is served.
    #[test]
    fn connections_past_the_cap_are_told_to_come_back() {
        use std::io::Read;
        let addr = bare_server(1);
        let held = TcpStream::connect(addr).unwrap();
        let reply = |mut s: TcpStream| {
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n");
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            text
        };
        // The held connection is counted once the acceptor takes it: wait until a second is refused.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let refused = loop {
            let text = reply(TcpStream::connect(addr).unwrap());
            if text.starts_with("HTTP/1.1 503") || std::time::Instant::now() > deadline {
                break text;
            }
        };
        assert!(refused.contains("1 connections are open: try again later"), "{refused}");
        drop(held);
        let served = loop {
            let text = reply(TcpStream::connect(addr).unwrap());
            if text.starts_with("HTTP/1.1 200") || std::time::Instant::now() > deadline {
                break text;
            }
        };
        assert!(served.contains("\"status\":\"ok\""), "{served}");
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
            ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding: gzip: only chunked"),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "ends before its last chunk"),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "\"zz\" is not hex"),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
                "not followed by a line end",
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\n", "the headers end"),
        ] {
            let got = read_request(&mut raw.as_bytes()).unwrap_err();
            assert!(got.contains(err), "{raw:?}: {got}");
        }
    }
}
