//! Text to token ids and back with a Hugging Face `tokenizer.json`: the byte-level BPE DeepSeek-V3's
//! checkpoints ship (and other models' of that family), so `v3r` takes and prints text.
//!
//! What the file describes is followed step by step, as Hugging Face `tokenizers` does:
//! 1. added tokens are found first in the raw text (leftmost, then longest; their `lstrip`,
//!    `rstrip` and `single_word` options) and become their ids as they are;
//! 2. the rest goes through the pre-tokenizer chain: `Split` (a regex or a string, any of the five
//!    behaviours, inverted or not), `Digits`, `ByteLevel` (bytes to the printable characters BPE
//!    works on, optionally GPT-2's own split first), nested `Sequence`s;
//! 3. each piece is merged by the BPE model, the lowest-ranked pair first (ties: leftmost);
//! 4. the post-processor's single-sequence template adds its special tokens (the file decides:
//!    transformers applies no `add_bos_token` / `add_eos_token` of `tokenizer_config.json` to a
//!    byte-level tokenizer either).
//!
//! A `tokenizer_config.json` beside the file may hold a chat template: [`Tokenizer::chat`] renders
//! a conversation with it as transformers' `apply_chat_template` does (Jinja, here minijinja with
//! Python's string methods; `trim_blocks` and `lstrip_blocks`, `raise_exception`, the special
//! tokens as variables) and encodes the text without adding the template's special tokens (the
//! chat template writes its own).
//!
//! Decoding maps each token back to its bytes (a token any of whose characters is outside the
//! byte map is taken as its UTF-8, as `tokenizers`' ByteLevel decoder does) and reads the bytes as
//! UTF-8, an invalid sequence becoming U+FFFD; [`TextStream`] does the same a token at a time,
//! holding back a character split across tokens. Anything else the file asks for (normalizers,
//! other models, pre-tokenizers or decoders) is refused on loading, by name.
//!
//! Checked against `tokenizers` and transformers themselves: `tests/fixtures/tokenizer/`
//! (`gen_tokenizer.py`).

use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use serde_json::Value;

/// A loaded tokenizer: see the module documentation.
pub struct Tokenizer {
    /// Each id's token as the file spells it (byte-level characters for the model's, the content
    /// for added tokens); `None` for ids nothing names.
    tokens: Vec<Option<String>>,
    /// The model's vocabulary.
    vocab: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    ignore_merges: bool,
    unk: Option<u32>,
    added: Vec<AddedToken>,
    /// Indices into `added` by the first byte of their content, longest content first.
    added_by_first_byte: HashMap<u8, Vec<usize>>,
    special: Vec<bool>,
    steps: Vec<PreStep>,
    /// Ids put before and after the text by the template.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// Whether decoding maps byte-level characters back to bytes (a ByteLevel decoder).
    byte_level_decoder: bool,
    byte_of_char: HashMap<char, u8>,
    char_of_byte: [char; 256],
    chat: Option<ChatTemplate>,
    /// The special-token variables of a chat template given later ([`Tokenizer::set_chat_template`]).
    names: Vec<(String, String)>,
    trie: std::sync::OnceLock<std::sync::Arc<crate::grammar::TokenTrie>>,
    /// Tries with some special tokens walked too ([`Tokenizer::trie_with`]), by those tokens.
    tries_with: std::sync::Mutex<Vec<(Vec<u32>, std::sync::Arc<crate::grammar::TokenTrie>)>>,
}

/// `tokenizer_config.json`'s chat template, ready to render, and the special tokens it may use.
struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// bos_token, eos_token, ... as the config spells them.
    tokens: Vec<(String, String)>,
}

struct AddedToken {
    id: u32,
    content: String,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

enum PreStep {
    Split { regex: fancy_regex::Regex, behavior: Behavior, invert: bool },
    ByteLevel { add_prefix_space: bool, gpt2_split: Option<fancy_regex::Regex> },
    Digits { individual: bool },
}

#[derive(Clone, Copy, PartialEq)]
enum Behavior {
    Removed,
    Isolated,
    MergedWithPrevious,
    MergedWithNext,
    Contiguous,
}

/// The largest vocabulary read (DeepSeek-V3's has 129,280 ids): a file naming ids past it is
/// refused rather than allocated for.
const MAX_IDS: usize = 1 << 24;

/// GPT-2's split, which a `ByteLevel` pre-tokenizer with `use_regex` applies first.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// Reads `path` (a `tokenizer.json`), and `tokenizer_config.json` beside it when there is one.
    /// Errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<Tokenizer, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config = match std::fs::read_to_string(&config_path) {
            Ok(c) => Some(c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", config_path.display())),
        };
        Tokenizer::from_json(&text, config.as_deref()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads a `tokenizer.json`, or the one in a directory (a checkpoint's), as
    /// [`Tokenizer::from_file`] does.
    pub fn from_path(path: &Path) -> Result<Tokenizer, String> {
        match path.is_dir() {
            true => Tokenizer::from_file(&path.join("tokenizer.json")),
            false => Tokenizer::from_file(path),
        }
    }

    /// A tokenizer from the text of a `tokenizer.json` (and of a `tokenizer_config.json`).
    pub fn from_json(text: &str, config: Option<&str>) -> Result<Tokenizer, String> {
        let root: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let model = root.get("model").ok_or("no \"model\"")?;
        match model.get("type").and_then(Value::as_str) {
            Some("BPE") | None if model.get("merges").is_some() => {}
            t => return Err(format!("model type {t:?}: only BPE is supported")),
        }
        for (key, ok) in [
            ("dropout", model.get("dropout").is_none_or(|d| d.is_null() || d.as_f64() == Some(0.0))),
            ("byte_fallback", model.get("byte_fallback").is_none_or(|b| b.as_bool() != Some(true))),
            ("continuing_subword_prefix", model.get("continuing_subword_prefix").is_none_or(Value::is_null)),
            ("end_of_word_suffix", model.get("end_of_word_suffix").is_none_or(Value::is_null)),
        ] {
            if !ok {
                return Err(format!("model.{key} = {} is not supported", model[key]));
            }
        }
        let mut vocab = HashMap::new();
        for (token, id) in model.get("vocab").and_then(Value::as_object).ok_or("model.vocab is not an object")? {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| format!("model.vocab[{token:?}] = {id} is not an id"))?;
            vocab.insert(token.clone(), id);
        }
        let mut merges = HashMap::new();
        let list = model.get("merges").and_then(Value::as_array).ok_or("model.merges is not an array")?;
        for (rank, m) in list.iter().enumerate() {
            // "a b" (the older spelling) or ["a", "b"].
            let (a, b) = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(p) if p.len() == 2 => {
                    p[0].as_str().zip(p[1].as_str()).map(|(a, b)| (a.to_string(), b.to_string()))
                }
                _ => None,
            }
            .ok_or_else(|| format!("model.merges[{rank}] = {m} is not a pair"))?;
            let id_of = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| format!("model.merges[{rank}]: {t:?} is not in the vocab"))
            };
            let merged = format!("{a}{b}");
            let pair = (id_of(&a)?, id_of(&b)?);
            merges.entry(pair).or_insert((rank as u32, id_of(&merged)?));
        }
        let unk = match model.get("unk_token").filter(|u| !u.is_null()) {
            None => None,
            Some(u) => Some(
                u.as_str()
                    .and_then(|u| vocab.get(u).copied())
                    .ok_or_else(|| format!("model.unk_token {u} is not in the vocab"))?,
            ),
        };

        let mut added = Vec::new();
        let mut special_ids = Vec::new();
        for (i, t) in
            root.get("added_tokens").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]).iter().enumerate()
        {
            let field = |k: &str| t.get(k).and_then(Value::as_bool).unwrap_or(false);
            let id = t.get("id").and_then(Value::as_u64).and_then(|i| u32::try_from(i).ok());
            let content = t.get("content").and_then(Value::as_str).filter(|c| !c.is_empty());
            let (Some(id), Some(content)) = (id, content) else {
                return Err(format!("added_tokens[{i}] has no id or content"));
            };
            if field("special") {
                special_ids.push(id);
            }
            added.push(AddedToken {
                id,
                content: content.to_string(),
                lstrip: field("lstrip"),
                rstrip: field("rstrip"),
                single_word: field("single_word"),
            });
        }
        match root.get("normalizer") {
            None | Some(Value::Null) => {}
            Some(n)
                if n.get("type").and_then(Value::as_str) == Some("Sequence")
                    && n.get("normalizers").and_then(Value::as_array).is_some_and(Vec::is_empty) => {}
            Some(n) => {
                return Err(format!(
                    "normalizer {}: not supported (DeepSeek-V3's tokenizers have none)",
                    n.get("type").unwrap_or(n)
                ))
            }
        }
        let mut steps = Vec::new();
        if let Some(p) = root.get("pre_tokenizer").filter(|p| !p.is_null()) {
            pre_steps(p, "pre_tokenizer", &mut steps)?;
        }
        let (prefix, suffix) = template(root.get("post_processor"), "post_processor")?;
        let byte_level_decoder = match root.get("decoder") {
            None | Some(Value::Null) => false,
            Some(d) => byte_level_decoder(d, "decoder")?,
        };

        let mut length = vocab.values().chain(added.iter().map(|a| &a.id)).map(|&i| i as usize + 1).max().unwrap_or(0);
        length = length.max(special_ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0));
        if length > MAX_IDS {
            return Err(format!("token id {}: more than a tokenizer holds (ids below {MAX_IDS})", length - 1));
        }
        let mut tokens = vec![None; length];
        for (t, &id) in &vocab {
            tokens[id as usize] = Some(t.clone());
        }
        for a in &added {
            tokens[a.id as usize] = Some(a.content.clone());
        }
        let mut special = vec![false; length];
        for &id in &special_ids {
            special[id as usize] = true;
        }
        let chat = match config {
            Some(config) => chat_template(config).map_err(|e| format!("tokenizer_config.json: {e}"))?,
            None => None,
        };
        // The special-token variables a template set later sees: the config's, else the
        // template's BOS as bos_token.
        let names = match config.and_then(|c| serde_json::from_str::<Value>(c).ok()) {
            Some(c) => config_tokens(&c),
            None => prefix
                .first()
                .and_then(|&id| tokens.get(id as usize)?.clone())
                .map(|t| ("bos_token".to_string(), t))
                .into_iter()
                .collect(),
        };
        let mut added_by_first_byte: HashMap<u8, Vec<usize>> = HashMap::new();
        for (i, a) in added.iter().enumerate() {
            added_by_first_byte.entry(a.content.as_bytes()[0]).or_default().push(i);
        }
        for list in added_by_first_byte.values_mut() {
            list.sort_by_key(|&i| std::cmp::Reverse(added[i].content.len()));
        }
        let char_of_byte = byte_chars();
        let byte_of_char = char_of_byte.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        Ok(Tokenizer {
            tokens,
            vocab,
            merges,
            ignore_merges: model.get("ignore_merges").and_then(Value::as_bool).unwrap_or(false),
            unk,
            added,
            added_by_first_byte,
            special,
            steps,
            prefix,
            suffix,
            byte_level_decoder,
            byte_of_char,
            char_of_byte,
            chat,
            names,
            trie: Default::default(),
            tries_with: Default::default(),
        })
    }

    /// Its tokens' byte trie (structured output's masks walk it), made on first use.
    pub fn trie(&self) -> std::sync::Arc<crate::grammar::TokenTrie> {
        self.trie.get_or_init(|| std::sync::Arc::new(crate::grammar::TokenTrie::of(self))).clone()
    }

    /// Its tokens' byte trie with the special tokens `specials` walked as their text too (a tool
    /// call's markers), made on first use.
    pub fn trie_with(&self, specials: &[u32]) -> std::sync::Arc<crate::grammar::TokenTrie> {
        if specials.is_empty() {
            return self.trie();
        }
        let mut made = self.tries_with.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = made.iter().find(|(s, _)| s == specials) {
            return t.clone();
        }
        let t = std::sync::Arc::new(crate::grammar::TokenTrie::with(self, specials));
        made.push((specials.to_vec(), t.clone()));
        t
    }

    /// Replaces the chat template (or gives one to a tokenizer without): `source`, Jinja as
    /// `tokenizer_config.json`'s `chat_template` is.
    pub fn set_chat_template(&mut self, source: &str) -> Result<(), String> {
        self.chat = Some(compile_chat(source.to_string(), self.names.clone())?);
        Ok(())
    }

    /// Whether `tokenizer_config.json` gave a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// A conversation (OpenAI's `messages`: objects with a `role` and a `content`) as the chat
    /// template writes it, with the assistant's turn opened when `add_generation_prompt`.
    pub fn render_chat(&self, messages: &Value, add_generation_prompt: bool) -> Result<String, String> {
        self.render_chat_with(messages, ChatContext::default(), add_generation_prompt)
    }

    /// [`Tokenizer::render_chat`] with what `context` gives the template beside the conversation.
    pub fn render_chat_with(
        &self,
        messages: &Value,
        context: ChatContext<'_>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let given = context;
        let chat = self.chat.as_ref().ok_or("no chat template (tokenizer_config.json has no chat_template)")?;
        let list = messages.as_array().ok_or_else(|| format!("messages: {messages} is not an array"))?;
        if list.is_empty() {
            return Err("messages: an empty conversation".into());
        }
        let mut messages = list.clone();
        for (i, m) in messages.iter_mut().enumerate() {
            if !m.get("role").is_some_and(Value::is_string) {
                return Err(format!("messages[{i}]: no \"role\" string"));
            }
            // OpenAI's content parts: the text ones joined by newlines (as vLLM does).
            if let Some(Value::Array(parts)) = m.get("content") {
                let texts = parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(format!("messages[{i}].content: {p} is not a text part (only text is served)")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                m["content"] = texts.join("\n").into();
            }
        }
        let template = chat.env.get_template("chat").map_err(|e| e.to_string())?;
        let mut context: HashMap<&str, minijinja::Value> =
            chat.tokens.iter().map(|(k, v)| (k.as_str(), v.as_str().into())).collect();
        for (k, v) in given.kwargs.into_iter().flatten() {
            if ["messages", "tools", "add_generation_prompt"].contains(&k.as_str()) {
                return Err(format!("chat_template_kwargs: {k} is the request's own"));
            }
            context.insert(k.as_str(), minijinja::Value::from(minijinja::value::Serde(v)));
        }
        context.insert("messages", minijinja::Value::from(minijinja::value::Serde(&messages)));
        context.insert("add_generation_prompt", add_generation_prompt.into());
        if let Some(tools) = given.tools {
            context.insert("tools", minijinja::Value::from(minijinja::value::Serde(tools)));
        }
        template.render(context).map_err(|e| format!("chat template: {}", chat_error(&e)))
    }

    /// A conversation as a request gives it, written by the chat template: OpenAI's `messages`
    /// array, or an object with `messages` and, as vLLM's requests have them, `tools`,
    /// `chat_template_kwargs` and `add_generation_prompt` (true unless said; other fields are the
    /// caller's to check).
    pub fn render_conversation(&self, conversation: &Value) -> Result<String, String> {
        let (messages, o) = match conversation {
            Value::Array(_) => (conversation, None),
            Value::Object(o) => (o.get("messages").ok_or("no \"messages\"")?, Some(o)),
            x => return Err(format!("{x} is neither a list of messages nor an object with \"messages\"")),
        };
        let field = |k: &str| o.and_then(|o| o.get(k)).filter(|v| !v.is_null());
        let kwargs = match field("chat_template_kwargs") {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(x) => return Err(format!("chat_template_kwargs: {x} is not an object")),
        };
        let turn = Turn::of(field)?;
        self.render_turn(messages, ChatContext { tools: field("tools"), kwargs }, turn)
    }

    /// [`Tokenizer::render_chat_with`] as `turn` says: the assistant's turn opened, or the final
    /// message left open for the model to continue (transformers' `continue_final_message`: the
    /// text cut after the final message's content, which the template wrote last — its end of
    /// turn dropped).
    pub fn render_turn(&self, messages: &Value, context: ChatContext<'_>, turn: Turn) -> Result<String, String> {
        let text = self.render_chat_with(messages, context, turn.open)?;
        if !turn.continue_final {
            return Ok(text);
        }
        let last = messages.as_array().and_then(|m| m.last()).map(|m| &m["content"]);
        let content = match last {
            Some(Value::String(c)) => c.as_str(),
            // Content parts: the last text one.
            Some(Value::Array(parts)) => parts.iter().rev().find_map(|p| p["text"].as_str()).unwrap_or_default(),
            _ => "",
        };
        let content = if text.contains(content) { content } else { content.trim() };
        match text.rfind(content) {
            Some(at) if !content.is_empty() => Ok(text[..at + content.len()].to_string()),
            _ => Err("continue_final_message: the final message's text is not in the chat template's (nothing \
                      to continue)"
                .into()),
        }
    }

    /// The ids of a conversation: [`Tokenizer::render_chat`], encoded with no special tokens added.
    pub fn chat(&self, messages: &Value, add_generation_prompt: bool) -> Result<Vec<u32>, String> {
        self.chat_with(messages, ChatContext::default(), add_generation_prompt)
    }

    /// The ids of a conversation with a context: [`Tokenizer::render_chat_with`], encoded.
    pub fn chat_with(&self, messages: &Value, context: ChatContext<'_>, gen: bool) -> Result<Vec<u32>, String> {
        Ok(self.encode(&self.render_chat_with(messages, context, gen)?, false))
    }

    /// One more than the largest id any token has.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token an id names, as the file spells it.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize)?.as_deref()
    }

    /// The id of a token, spelled as the file does (added tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.added.iter().find(|a| a.content == token).map(|a| a.id).or_else(|| self.vocab.get(token).copied())
    }

    /// Whether an id is a special token (skipped by decoding that skips them).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The ids of `text`; with `add_special_tokens`, between the template's special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        if add_special_tokens {
            ids.extend_from_slice(&self.prefix);
        }
        let mut at = 0;
        while let Some((start, end, id)) = self.next_added(text, at) {
            self.encode_plain(&text[at..start], &mut ids);
            ids.push(id);
            at = end;
        }
        self.encode_plain(&text[at..], &mut ids);
        if add_special_tokens {
            ids.extend_from_slice(&self.suffix);
        }
        ids
    }

    /// The next added token in `text` from byte `from` (the leftmost; of those starting there, the
    /// longest that its options allow): its span, whitespace it strips included, and id.
    fn next_added(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        let bytes = text.as_bytes();
        for start in from..bytes.len() {
            if !text.is_char_boundary(start) {
                continue;
            }
            let Some(candidates) = self.added_by_first_byte.get(&bytes[start]) else { continue };
            for &i in candidates {
                let a = &self.added[i];
                let end = start + a.content.len();
                if !text[start..].starts_with(a.content.as_str()) {
                    continue;
                }
                if a.single_word
                    && (text[..start].chars().next_back().is_some_and(is_word_char)
                        || text[end..].chars().next().is_some_and(is_word_char))
                {
                    continue;
                }
                let mut span = (start, end);
                if a.lstrip {
                    span.0 = from + text[from..start].trim_end().len();
                }
                if a.rstrip {
                    span.1 = text.len() - text[end..].trim_start().len();
                }
                return Some((span.0, span.1, a.id));
            }
        }
        None
    }

    /// Text with no added tokens in it: pre-tokenized, then each piece merged.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut pieces = vec![text.to_string()];
        for step in &self.steps {
            pieces = pieces.iter().flat_map(|p| self.pre_tokenize(step, p)).filter(|p| !p.is_empty()).collect();
        }
        for piece in &pieces {
            self.merge(piece, ids);
        }
    }

    fn pre_tokenize(&self, step: &PreStep, piece: &str) -> Vec<String> {
        match step {
            PreStep::Split { regex, behavior, invert } => split(piece, regex, *behavior, *invert),
            PreStep::Digits { individual } => {
                let spans = char_spans(piece, |c| c.is_numeric());
                let behavior = if *individual { Behavior::Isolated } else { Behavior::Contiguous };
                arrange(piece, spans, behavior)
            }
            PreStep::ByteLevel { add_prefix_space, gpt2_split } => {
                let parts = match gpt2_split {
                    Some(regex) => split(piece, regex, Behavior::Isolated, false),
                    None => vec![piece.to_string()],
                };
                parts
                    .into_iter()
                    .map(|p| {
                        let spaced = if *add_prefix_space && !p.starts_with(' ') { format!(" {p}") } else { p };
                        spaced.bytes().map(|b| self.char_of_byte[b as usize]).collect()
                    })
                    .collect()
            }
        }
    }

    /// BPE over one piece: its characters' ids, the lowest-ranked adjacent pair merged first (ties:
    /// leftmost) until no pair merges.
    fn merge(&self, piece: &str, ids: &mut Vec<u32>) {
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(piece) {
                ids.push(id);
                return;
            }
        }
        struct Symbol {
            id: u32,
            prev: usize,
            next: usize,
            alive: bool,
        }
        const NONE: usize = usize::MAX;
        let mut symbols: Vec<Symbol> = Vec::with_capacity(piece.len());
        let mut buf = [0u8; 4];
        for c in piece.chars() {
            let Some(id) = self.vocab.get(c.encode_utf8(&mut buf) as &str).copied().or(self.unk) else { continue };
            let n = symbols.len();
            symbols.push(Symbol { id, prev: if n == 0 { NONE } else { n - 1 }, next: n + 1, alive: true });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = NONE;
        }
        // Min-heap on (rank, position), with the merged id to tell a stale entry.
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<std::cmp::Reverse<(u32, usize, u32)>>, left: u32, right: u32, at: usize| {
            if let Some(&(rank, merged)) = self.merges.get(&(left, right)) {
                heap.push(std::cmp::Reverse((rank, at, merged)));
            }
        };
        for i in 1..symbols.len() {
            push(&mut heap, symbols[i - 1].id, symbols[i].id, i - 1);
        }
        while let Some(std::cmp::Reverse((_, at, merged))) = heap.pop() {
            let next = symbols[at].next;
            if !symbols[at].alive
                || next == NONE
                || self.merges.get(&(symbols[at].id, symbols[next].id)).map(|m| m.1) != Some(merged)
            {
                continue;
            }
            symbols[at].id = merged;
            symbols[next].alive = false;
            let after = symbols[next].next;
            symbols[at].next = after;
            if after != NONE {
                symbols[after].prev = at;
                push(&mut heap, merged, symbols[after].id, at);
            }
            let prev = symbols[at].prev;
            if prev != NONE {
                push(&mut heap, symbols[prev].id, merged, prev);
            }
        }
        ids.extend(symbols.iter().filter(|s| s.alive).map(|s| s.id));
    }

    /// The bytes a token stands for (an unknown id: none; a skipped special token: none).
    fn token_bytes(&self, id: u32, skip_special: bool, out: &mut Vec<u8>) {
        let Some(token) = self.token(id) else { return };
        if skip_special && self.is_special(id) {
            return;
        }
        if self.byte_level_decoder {
            let start = out.len();
            for c in token.chars() {
                match self.byte_of_char.get(&c) {
                    Some(&b) => out.push(b),
                    None => {
                        out.truncate(start);
                        out.extend_from_slice(token.as_bytes());
                        return;
                    }
                }
            }
        } else {
            out.extend_from_slice(token.as_bytes());
        }
    }

    /// The bytes one token stands for (special tokens included; none for an unknown id).
    pub fn token_bytes_of(&self, id: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.token_bytes(id, false, &mut bytes);
        bytes
    }

    /// The text of `ids`: their bytes read as UTF-8, an invalid sequence becoming U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            self.token_bytes(id, skip_special_tokens, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Decoding a token at a time, as tokens are generated.
    pub fn stream(self: &std::sync::Arc<Self>, skip_special_tokens: bool) -> TextStream {
        TextStream { tokenizer: self.clone(), skip_special_tokens, pending: Vec::new() }
    }
}

/// Decodes a token at a time: [`TextStream::push`] returns the text that is whole so far (a UTF-8
/// character split across tokens waits for its last byte), [`TextStream::finish`] the rest. All
/// the pieces together are [`Tokenizer::decode`] of all the tokens.
pub struct TextStream {
    tokenizer: std::sync::Arc<Tokenizer>,
    skip_special_tokens: bool,
    pending: Vec<u8>,
}

impl TextStream {
    pub fn push(&mut self, id: u32) -> String {
        self.tokenizer.token_bytes(id, self.skip_special_tokens, &mut self.pending);
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    text.push_str(s);
                    self.pending.clear();
                    return text;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    text.push_str(std::str::from_utf8(&self.pending[..valid]).expect("checked"));
                    match e.error_len() {
                        // Cut short: the rest may come with the next token.
                        None => {
                            self.pending.drain(..valid);
                            return text;
                        }
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// What is held back, as decoding all the tokens would end.
    pub fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned()
    }
}

/// The chat template of a `tokenizer_config.json` (a string, or a list of named ones: "default"),
/// compiled as transformers compiles it ([`compile_chat`]); None when it has none.
fn chat_template(config: &str) -> Result<Option<ChatTemplate>, String> {
    let c: Value = serde_json::from_str(config).map_err(|e| format!("not JSON: {e}"))?;
    let source = match c.get("chat_template") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .ok_or("chat_template: a list of templates with no \"default\" one")?
            .to_string(),
        Some(x) => return Err(format!("chat_template: {x} is not a template")),
    };
    compile_chat(source, config_tokens(&c)).map(Some).map_err(|e| format!("chat_template: {e}"))
}

/// The special tokens a `tokenizer_config.json` names (bos_token, eos_token, unk_token,
/// pad_token), as templates use them.
fn config_tokens(c: &Value) -> Vec<(String, String)> {
    let mut tokens = Vec::new();
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(t) = c.get(key).map(|t| t.get("content").unwrap_or(t)).and_then(Value::as_str) {
            tokens.push((key.to_string(), t.to_string()));
        }
    }
    tokens
}

/// A chat template compiled as transformers compiles it: `trim_blocks`, `lstrip_blocks`, Python's
/// string methods, `raise_exception`, transformers' `tojson` (Python's `json.dumps`, not HTML
/// escaped); `tokens` its special-token variables.
fn compile_chat(source: String, tokens: Vec<(String, String)>) -> Result<ChatTemplate, String> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
    env.set_syntax(syntax.map_err(|e| e.to_string())?);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
    });
    env.add_filter("tojson", tojson);
    env.add_template_owned("chat", source).map_err(|e| chat_error(&e))?;
    Ok(ChatTemplate { env, tokens })
}

/// How a conversation's prompt ends (vLLM's `add_generation_prompt` and `continue_final_message`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// The assistant's turn opened (the template's `add_generation_prompt`).
    pub open: bool,
    /// The final message left open: the model continues it (an assistant's reply prefilled).
    pub continue_final: bool,
}

impl Turn {
    /// The assistant's turn opened, as a chat is by default.
    pub const OPEN: Turn = Turn { open: true, continue_final: false };

    /// A request's, from its fields (`field` gives a field's value, None where absent or null):
    /// `add_generation_prompt` true unless said, or unless `continue_final_message` is; both true
    /// refused.
    pub fn of<'v>(field: impl Fn(&str) -> Option<&'v Value>) -> Result<Turn, String> {
        let flag = |k: &str| -> Result<Option<bool>, String> {
            field(k).map(|x| x.as_bool().ok_or_else(|| format!("{k}: {x} is not true or false"))).transpose()
        };
        let continue_final = flag("continue_final_message")?.unwrap_or(false);
        let open = flag("add_generation_prompt")?.unwrap_or(!continue_final);
        if open && continue_final {
            return Err("continue_final_message with add_generation_prompt: the final message is continued, or \
                        the assistant's turn opened, not both"
                .into());
        }
        Ok(Turn { open, continue_final })
    }
}

/// What a chat template is given beside the conversation and `add_generation_prompt`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatContext<'a> {
    /// OpenAI's `tools` (the functions the model may call), as transformers gives them (`tools`;
    /// left undefined when None).
    pub tools: Option<&'a Value>,
    /// vLLM's `chat_template_kwargs`: more variables (DeepSeek-V3.1's `thinking`, say).
    pub kwargs: Option<&'a serde_json::Map<String, Value>>,
}

impl<'a> ChatContext<'a> {
    pub fn tools(tools: Option<&'a Value>) -> ChatContext<'a> {
        ChatContext { tools, kwargs: None }
    }
}

/// transformers' `tojson` filter: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each of those a keyword argument.
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> Result<String, minijinja::Error> {
    let bad = |m: String| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, m);
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match (separators, indent) {
        (Some(s), _) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        (Some(s), _) => return Err(bad(format!("tojson: separators {s:?} are not two strings"))),
        (None, None) => (", ".to_string(), ": ".to_string()),
        (None, Some(_)) => (",".to_string(), ": ".to_string()),
    };
    let v = serde_json::to_value(&value).map_err(|e| bad(format!("tojson: {e}")))?;
    let dumps = PyJson {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        item,
        key,
    };
    let mut out = String::new();
    dumps.write(&v, 0, &mut out);
    Ok(out)
}

/// Python's `json.dumps` settings.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<usize>,
    sort_keys: bool,
    item: String,
    key: String,
}

impl PyJson {
    fn write(&self, v: &Value, level: usize, out: &mut String) {
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match n.as_f64() {
                Some(x) if !(n.is_i64() || n.is_u64()) => out.push_str(&python_float(x)),
                _ => out.push_str(&n.to_string()),
            },
            Value::String(s) => self.string(s, out),
            Value::Array(items) => {
                let each: Vec<&Value> = items.iter().collect();
                self.container(('[', ']'), each.len(), level, out, |k, out| self.write(each[k], level + 1, out));
            }
            Value::Object(o) => {
                let mut members: Vec<(&String, &Value)> = o.iter().collect();
                if self.sort_keys {
                    members.sort_by(|a, b| a.0.cmp(b.0));
                }
                self.container(('{', '}'), members.len(), level, out, |k, out| {
                    self.string(members[k].0, out);
                    out.push_str(&self.key);
                    self.write(members[k].1, level + 1, out);
                });
            }
        }
    }

    /// `n` members between `open` and `close`, each on its own indented line with `indent`.
    fn container(
        &self,
        (open, close): (char, char),
        n: usize,
        level: usize,
        out: &mut String,
        member: impl Fn(usize, &mut String),
    ) {
        out.push(open);
        if n == 0 {
            out.push(close);
            return;
        }
        let line = |level: usize, out: &mut String| {
            if let Some(i) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(i * level));
            }
        };
        for k in 0..n {
            if k > 0 {
                out.push_str(&self.item);
            }
            line(level + 1, out);
            member(k, out);
        }
        line(level, out);
        out.push(close);
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it: the shortest digits that read back, in positional
/// notation for exponents -4 to 15 (with `.0` when whole), else as `1.5e+16`, `1e-05`.
fn python_float(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "NaN".into()
        } else if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if x == 0.0 || (-4..16).contains(&exp) {
        let fixed = format!("{x}");
        return if fixed.contains('.') { fixed } else { fixed + ".0" };
    }
    format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
}

/// A template error and what caused it, on one line.
fn chat_error(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// The pre-tokenizer steps a JSON pre-tokenizer describes (a `Sequence` is flattened).
fn pre_steps(p: &Value, at: &str, steps: &mut Vec<PreStep>) -> Result<(), String> {
    let kind = p.get("type").and_then(Value::as_str).ok_or_else(|| format!("{at} has no type"))?;
    let flag = |k: &str, default: bool| p.get(k).and_then(Value::as_bool).unwrap_or(default);
    match kind {
        "Sequence" => {
            for (i, q) in p
                .get("pretokenizers")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("{at}.pretokenizers is not an array"))?
                .iter()
                .enumerate()
            {
                pre_steps(q, &format!("{at}.pretokenizers[{i}]"), steps)?;
            }
        }
        "Split" => {
            let pattern = p.get("pattern").ok_or_else(|| format!("{at} has no pattern"))?;
            let source =
                match (pattern.get("Regex").and_then(Value::as_str), pattern.get("String").and_then(Value::as_str)) {
                    (Some(r), _) => r.to_string(),
                    (None, Some(s)) => fancy_regex::escape(s).into_owned(),
                    _ => return Err(format!("{at}.pattern {pattern} is neither a Regex nor a String")),
                };
            let regex = fancy_regex::Regex::new(&source).map_err(|e| format!("{at}.pattern {source:?}: {e}"))?;
            let behavior = match p.get("behavior").and_then(Value::as_str) {
                Some("Removed") => Behavior::Removed,
                Some("Isolated") => Behavior::Isolated,
                Some("MergedWithPrevious") => Behavior::MergedWithPrevious,
                Some("MergedWithNext") => Behavior::MergedWithNext,
                Some("Contiguous") => Behavior::Contiguous,
                b => return Err(format!("{at}.behavior {b:?} is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous")),
            };
            steps.push(PreStep::Split { regex, behavior, invert: flag("invert", false) });
        }
        "ByteLevel" => {
            let gpt2_split = if flag("use_regex", true) {
                Some(fancy_regex::Regex::new(GPT2_SPLIT).expect("GPT-2's split is a valid regex"))
            } else {
                None
            };
            steps.push(PreStep::ByteLevel { add_prefix_space: flag("add_prefix_space", true), gpt2_split });
        }
        "Digits" => steps.push(PreStep::Digits { individual: flag("individual_digits", false) }),
        other => return Err(format!("{at} type {other:?}: not supported (Sequence, Split, ByteLevel, Digits are)")),
    }
    Ok(())
}

/// The ids a post-processor puts before and after a single sequence.
fn template(p: Option<&Value>, at: &str) -> Result<(Vec<u32>, Vec<u32>), String> {
    let Some(p) = p.filter(|p| !p.is_null()) else { return Ok((Vec::new(), Vec::new())) };
    match p.get("type").and_then(Value::as_str) {
        // Offsets only.
        Some("ByteLevel") => Ok((Vec::new(), Vec::new())),
        Some("Sequence") => {
            let (mut before, mut after) = (Vec::new(), Vec::new());
            for (i, q) in p
                .get("processors")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("{at}.processors is not an array"))?
                .iter()
                .enumerate()
            {
                let (b, a) = template(Some(q), &format!("{at}.processors[{i}]"))?;
                before.splice(0..0, b);
                after.extend(a);
            }
            Ok((before, after))
        }
        Some("TemplateProcessing") => {
            let pieces =
                p.get("single").and_then(Value::as_array).ok_or_else(|| format!("{at}.single is not an array"))?;
            let (mut before, mut after, mut seen_text) = (Vec::new(), Vec::new(), false);
            for piece in pieces {
                if piece.get("Sequence").is_some() {
                    seen_text = true;
                    continue;
                }
                let name = piece
                    .pointer("/SpecialToken/id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("{at}.single: {piece} is neither a Sequence nor a SpecialToken"))?;
                let ids = p
                    .pointer(&format!("/special_tokens/{}", name.replace('~', "~0").replace('/', "~1")))
                    .and_then(|s| s.get("ids"))
                    .and_then(Value::as_array)
                    .ok_or_else(|| format!("{at}.special_tokens has no {name:?}"))?;
                let ids = ids
                    .iter()
                    .map(|i| {
                        i.as_u64()
                            .and_then(|i| u32::try_from(i).ok())
                            .ok_or_else(|| format!("{at}.special_tokens[{name:?}]: {i} is not an id"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if seen_text {
                    after.extend(ids)
                } else {
                    before.extend(ids)
                }
            }
            Ok((before, after))
        }
        t => Err(format!("{at} type {t:?}: not supported (TemplateProcessing, ByteLevel, Sequence are)")),
    }
}

/// Whether a decoder maps byte-level characters back to bytes; other decoders are refused.
fn byte_level_decoder(d: &Value, at: &str) -> Result<bool, String> {
    match d.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => Ok(true),
        Some("Sequence") => {
            let mut any = false;
            for (i, q) in d
                .get("decoders")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("{at}.decoders is not an array"))?
                .iter()
                .enumerate()
            {
                any |= byte_level_decoder(q, &format!("{at}.decoders[{i}]"))?;
            }
            Ok(any)
        }
        t => Err(format!("{at} type {t:?}: not supported (ByteLevel, Sequence are)")),
    }
}

/// GPT-2's map of bytes to printable characters: the printable Latin-1 ones stand for themselves,
/// the others (controls, space, ...) take the characters from U+0100 on, in byte order.
fn byte_chars() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut chars = ['\0'; 256];
    let mut next = 0x100;
    for b in 0..256u32 {
        chars[b as usize] = if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below U+0200")
        };
    }
    chars
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The spans of `piece` matched by `regex` and between them, in order, as (start, end, matched).
fn split(piece: &str, regex: &fancy_regex::Regex, behavior: Behavior, invert: bool) -> Vec<String> {
    let mut spans = Vec::new();
    let mut prev = 0;
    for m in regex.find_iter(piece) {
        // A regex that cannot finish on some input: that input stays one piece.
        let Ok(m) = m else { return vec![piece.to_string()] };
        if m.start() == m.end() {
            continue;
        }
        if prev != m.start() {
            spans.push((prev, m.start(), invert));
        }
        spans.push((m.start(), m.end(), !invert));
        prev = m.end();
    }
    if prev != piece.len() {
        spans.push((prev, piece.len(), invert));
    }
    arrange(piece, spans, behavior)
}

/// Runs of characters where `f` holds (each character its own span) and the text between.
fn char_spans(piece: &str, f: impl Fn(char) -> bool) -> Vec<(usize, usize, bool)> {
    let mut spans: Vec<(usize, usize, bool)> = Vec::new();
    for (i, c) in piece.char_indices() {
        let hit = f(c);
        match spans.last_mut() {
            Some(last) if !hit && !last.2 => last.1 = i + c.len_utf8(),
            _ => spans.push((i, i + c.len_utf8(), hit)),
        }
    }
    spans
}

/// Pieces from matched and unmatched spans, as a split behaviour puts them together.
fn arrange(piece: &str, spans: Vec<(usize, usize, bool)>, behavior: Behavior) -> Vec<String> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut previous_match = false;
    match behavior {
        Behavior::Removed => out.extend(spans.iter().filter(|s| !s.2).map(|s| (s.0, s.1))),
        Behavior::Isolated => out.extend(spans.iter().map(|s| (s.0, s.1))),
        Behavior::MergedWithPrevious => {
            for (start, end, matched) in spans {
                match out.last_mut() {
                    Some(last) if matched && !previous_match => last.1 = end,
                    _ => out.push((start, end)),
                }
                previous_match = matched;
            }
        }
        Behavior::MergedWithNext => {
            for (start, end, matched) in spans.into_iter().rev() {
                match out.last_mut() {
                    Some(last) if matched && !previous_match => last.0 = start,
                    _ => out.push((start, end)),
                }
                previous_match = matched;
            }
            out.reverse();
        }
        Behavior::Contiguous => {
            for (i, (start, end, matched)) in spans.into_iter().enumerate() {
                match out.last_mut() {
                    Some(last) if i > 0 && matched == previous_match => last.1 = end,
                    _ => out.push((start, end)),
                }
                previous_match = matched;
            }
        }
    }
    out.into_iter().map(|(s, e)| piece[s..e].to_string()).collect()
}

/// The committed fixture tokenizer (`tests/fixtures/tokenizer/`, which `gen_tokenizer.py` wrote),
/// for the tests of this crate.
#[cfg(test)]
pub(crate) mod fixture {
    use std::sync::{Arc, OnceLock};

    /// Its tokenizer.json.
    pub fn path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/tokenizer.json")
    }

    /// Its tokenizer.json as JSON (to make variants of it from).
    pub fn json() -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap()
    }

    /// The tokenizer, read once and shared.
    pub fn shared() -> Arc<super::Tokenizer> {
        static READ: OnceLock<Arc<super::Tokenizer>> = OnceLock::new();
        READ.get_or_init(|| Arc::new(super::Tokenizer::from_file(&path()).unwrap())).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer")
    }

    fn fixture() -> Tokenizer {
        Tokenizer::from_file(&fixture_dir().join("tokenizer.json")).unwrap()
    }

    #[test]
    fn encodes_and_decodes_as_hugging_face_tokenizers_does() {
        let t = fixture();
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap()).unwrap();
        assert_eq!(t.vocab_size() as u64, expected["vocab_size"].as_u64().unwrap());
        let cases = expected["cases"].as_array().unwrap();
        assert!(cases.len() > 300);
        let ids = |v: &Value| v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect::<Vec<_>>();
        let mut wrong = Vec::new();
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let (with, without) = (ids(&c["ids"]), ids(&c["ids_without_template"]));
            if t.encode(text, true) != with || t.encode(text, false) != without {
                wrong.push(format!("encode {text:?}: {:?}, tokenizers {with:?}", t.encode(text, true)));
            }
            for (skip, key) in [(false, "decoded"), (true, "decoded_skipping_special")] {
                if t.decode(&with, skip) != c[key].as_str().unwrap() {
                    wrong.push(format!(
                        "decode {with:?} (skip special {skip}): {:?}, tokenizers {}",
                        t.decode(&with, skip),
                        c[key]
                    ));
                }
            }
        }
        assert!(wrong.is_empty(), "{} of {} cases differ:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
    }

    fn fixture_json() -> Value {
        super::fixture::json()
    }

    fn expected_chat() -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("expected_chat.json")).unwrap()).unwrap()
    }

    /// tokenizer_config.json's add_bos_token / add_eos_token change nothing: the file's template
    /// decides, as in transformers (the ids it gave for each combination).
    #[test]
    fn the_files_template_decides_the_special_tokens_whatever_the_config_says() {
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("tokenizer_config.json")).unwrap())
                .unwrap();
        for case in expected_chat()["switches"].as_array().unwrap() {
            let mut json = fixture_json();
            if case["template"] == false {
                json["post_processor"] = serde_json::json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
            }
            let mut c = config.clone();
            c["add_bos_token"] = case["add_bos_token"].clone();
            c["add_eos_token"] = case["add_eos_token"].clone();
            let t = Tokenizer::from_json(&json.to_string(), Some(&c.to_string())).unwrap();
            let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
            assert_eq!(t.encode("Hello", true), want, "{case}");
        }
    }

    /// transformers' `continue_final_message`: the final message left open — the template's text
    /// cut after its content — is the prompt with the assistant's turn opened and the message's
    /// text after it (DeepSeek-V3's template); with content parts, the last text part; the flags
    /// as vLLM reads them.
    #[test]
    fn a_continued_final_message_is_the_opened_turn_with_its_text() {
        let t = fixture();
        let user = serde_json::json!([{"role": "user", "content": "Hi"}]);
        let opened = t.render_chat(&user, true).unwrap();
        let continued = Turn { open: false, continue_final: true };
        for content in
            [serde_json::json!("The answer is"), serde_json::json!([{"type": "text", "text": "The answer is"}])]
        {
            let chat =
                serde_json::json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]);
            let text = t.render_turn(&chat, ChatContext::default(), continued).unwrap();
            assert_eq!(text, format!("{opened}The answer is"));
            let closed = t.render_turn(&chat, ChatContext::default(), Turn { open: false, continue_final: false });
            assert!(closed.unwrap().starts_with(&text), "the closed turn goes on past the text");
        }
        let empty = serde_json::json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]);
        let err = t.render_turn(&empty, ChatContext::default(), continued).unwrap_err();
        assert!(err.starts_with("continue_final_message: the final message's text is not in"), "{err}");
        let of = |v: serde_json::Value| Turn::of(|k| v.get(k).filter(|x| !x.is_null()));
        assert_eq!(of(serde_json::json!({})).unwrap(), Turn::OPEN);
        assert_eq!(of(serde_json::json!({"continue_final_message": true})).unwrap(), continued);
        let both = serde_json::json!({"continue_final_message": true, "add_generation_prompt": true});
        assert!(of(both).unwrap_err().starts_with("continue_final_message with add_generation_prompt"));
        assert!(of(serde_json::json!({"continue_final_message": 1})).unwrap_err().contains("is not true or false"));
    }

    /// Conversations render and encode as transformers' apply_chat_template makes them, and a
    /// template's raise_exception is an error with its message.
    #[test]
    fn chat_templates_render_as_transformers_renders_them() {
        let t = fixture();
        assert!(t.has_chat_template());
        let expected = expected_chat();
        let cases = expected["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for c in cases {
            let generation = c["add_generation_prompt"].as_bool().unwrap();
            let tools = ChatContext::tools(c.get("tools"));
            let text = t.render_chat_with(&c["messages"], tools, generation).unwrap();
            assert_eq!(text, c["text"].as_str().unwrap(), "{c}");
            let ids: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
            assert_eq!(t.chat_with(&c["messages"], tools, generation).unwrap(), ids, "{c}");
        }
        assert!(cases.iter().filter(|c| c.get("tools").is_some()).count() >= 6);
        // transformers' tojson: Python's json.dumps and its keyword arguments.
        let tojson = expected["tojson"].as_array().unwrap();
        assert!(tojson.len() >= 8);
        for c in tojson {
            let mut given = fixture();
            given.set_chat_template(c["template"].as_str().unwrap()).unwrap();
            let hi = serde_json::json!([{"role": "user", "content": "x"}]);
            let text = given.render_chat_with(&hi, ChatContext::tools(Some(&c["tools"])), false).unwrap();
            assert_eq!(text, c["text"].as_str().unwrap(), "{}", c["template"]);
        }
        let raises = &expected["raises"];
        let e = t.render_chat(&raises["messages"], true).unwrap_err();
        assert!(e.starts_with("chat template: ") && e.contains(raises["error"].as_str().unwrap()), "{e}");
        assert_eq!(t.render_chat(&serde_json::json!([]), true).unwrap_err(), "messages: an empty conversation");
        // Content as OpenAI's parts: the text ones joined by newlines; others refused.
        let parts = serde_json::json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
        let joined = serde_json::json!([{"role": "user", "content": "a\nb"}]);
        assert_eq!(t.render_chat(&parts, true).unwrap(), t.render_chat(&joined, true).unwrap());
        let image =
            serde_json::json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert!(t.render_chat(&image, true).unwrap_err().starts_with("messages[0].content: {\"type\":\"image_url\""));
        assert_eq!(
            t.render_chat(&serde_json::json!([{"content": "x"}]), true).unwrap_err(),
            "messages[0]: no \"role\" string"
        );
        let plain = Tokenizer::from_json(&fixture_json().to_string(), None).unwrap();
        assert!(plain.render_chat(&cases[0]["messages"], true).unwrap_err().starts_with("no chat template"));
        // A template given later: the config's token variables, or the template's BOS without one.
        let mine = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}";
        let mut given = fixture();
        given.set_chat_template(mine).unwrap();
        let hi = serde_json::json!([{"role": "user", "content": "hi"}]);
        assert_eq!(given.render_chat(&hi, true).unwrap(), "<｜begin▁of▁sentence｜>[user]hi");
        // vLLM's chat_template_kwargs: more variables (a template switching its reasoning on).
        let mut r1 = fixture();
        let switch = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}\
                      {% if add_generation_prompt %}<｜Assistant｜>{% if thinking %}<think>{% endif %}{% endif %}";
        r1.set_chat_template(switch).unwrap();
        let on = serde_json::json!({"thinking": true});
        let thinking = ChatContext { tools: None, kwargs: on.as_object() };
        let bos = "<｜begin▁of▁sentence｜>";
        assert_eq!(r1.render_chat_with(&hi, thinking, true).unwrap(), format!("{bos}hi<｜Assistant｜><think>"));
        assert_eq!(r1.render_chat(&hi, true).unwrap(), format!("{bos}hi<｜Assistant｜>"));
        assert_eq!(r1.render_chat_with(&hi, thinking, false).unwrap(), format!("{bos}hi"));
        let own = serde_json::json!({"messages": []});
        let own = ChatContext { tools: None, kwargs: own.as_object() };
        assert_eq!(
            r1.render_chat_with(&hi, own, true).unwrap_err(),
            "chat_template_kwargs: messages is the request's own"
        );
        let mut bare = Tokenizer::from_json(&fixture_json().to_string(), None).unwrap();
        bare.set_chat_template(mine).unwrap();
        assert_eq!(bare.render_chat(&hi, true).unwrap(), "<｜begin▁of▁sentence｜>[user]hi");
        assert!(bare.set_chat_template("{% for %}").is_err());
        let broken =
            Tokenizer::from_json(&fixture_json().to_string(), Some(r#"{"chat_template": "{% if %}"}"#)).err().unwrap();
        assert!(broken.starts_with("tokenizer_config.json: chat_template: "), "{broken}");
    }

    #[test]
    fn what_is_not_supported_is_refused_by_name() {
        let with = |pointer: &str, v: Value| {
            let mut json = fixture_json();
            *json.pointer_mut(pointer).unwrap() = v;
            Tokenizer::from_json(&json.to_string(), None).err().unwrap()
        };
        assert_eq!(with("/model/type", "WordPiece".into()), "model type Some(\"WordPiece\"): only BPE is supported");
        assert_eq!(with("/model/byte_fallback", true.into()), "model.byte_fallback = true is not supported");
        assert_eq!(
            with("/added_tokens/0/id", 4_000_000_000u64.into()),
            "token id 4000000000: more than a tokenizer holds (ids below 16777216)"
        );
        assert_eq!(
            with("/normalizer", serde_json::json!({"type": "NFKC"})),
            "normalizer \"NFKC\": not supported (DeepSeek-V3's tokenizers have none)"
        );
        assert_eq!(
            with("/pre_tokenizer/pretokenizers/1", serde_json::json!({"type": "Metaspace"})),
            "pre_tokenizer.pretokenizers[1] type \"Metaspace\": not supported (Sequence, Split, ByteLevel, Digits are)"
        );
        assert!(with("/pre_tokenizer/pretokenizers/0/pattern", serde_json::json!({"Regex": "("}))
            .starts_with("pre_tokenizer.pretokenizers[0].pattern \"(\": "));
        assert_eq!(
            with("/model/merges/3", serde_json::json!(["Ġ", "nope"])),
            "model.merges[3]: \"nope\" is not in the vocab"
        );
        assert_eq!(
            with("/decoder", serde_json::json!({"type": "WordPiece"})),
            "decoder type Some(\"WordPiece\"): not supported (ByteLevel, Sequence are)"
        );
        assert_eq!(
            Tokenizer::from_json("{", None).err().unwrap(),
            "not JSON: EOF while parsing an object at line 1 column 1"
        );
        let e = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).err().unwrap();
        assert!(e.starts_with("/nonexistent/tokenizer.json: "), "{e}");
    }

    #[test]
    fn split_behaviours_put_matches_where_tokenizers_does() {
        let digits = fancy_regex::Regex::new(r"\d+").unwrap();
        let cases = [
            (Behavior::Removed, false, vec!["ab", "cd", "e"]),
            (Behavior::Isolated, false, vec!["ab", "12", "cd", "3", "e"]),
            (Behavior::MergedWithPrevious, false, vec!["ab12", "cd3", "e"]),
            (Behavior::MergedWithNext, false, vec!["ab", "12cd", "3e"]),
            (Behavior::Contiguous, false, vec!["ab", "12", "cd", "3", "e"]),
            (Behavior::Removed, true, vec!["12", "3"]),
            (Behavior::MergedWithPrevious, true, vec!["ab", "12cd", "3e"]),
        ];
        for (behavior, invert, want) in cases {
            assert_eq!(split("ab12cd3e", &digits, behavior, invert), want);
        }
        let each = arrange("a12b", char_spans("a12b", |c| c.is_numeric()), Behavior::Isolated);
        assert_eq!(each, ["a", "1", "2", "b"]);
        assert_eq!(arrange("a12b", char_spans("a12b", |c| c.is_numeric()), Behavior::Contiguous), ["a", "12", "b"]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        #[test]
        fn any_text_comes_back_from_its_ids(text in "\\PC{0,60}|[ \t\r\n\u{a0}a-z0-9.]{0,30}") {
            // Not the added tokens that eat whitespace or spell bytes as Latin-1.
            proptest::prop_assume!(!text.contains("<tool>") && !text.contains("grüß"));
            let t = fixture();
            let ids = t.encode(&text, true);
            proptest::prop_assert_eq!(t.decode(&ids, true), text.clone());
            proptest::prop_assert_eq!(t.encode(&text, false), ids[1..].to_vec());
        }

        #[test]
        fn streaming_decodes_what_decoding_all_at_once_does(ids in proptest::collection::vec(0u32..980, 0..40), skip in proptest::bool::ANY) {
            let t = std::sync::Arc::new(fixture());
            let mut stream = t.stream(skip);
            let mut text: String = ids.iter().map(|&id| stream.push(id)).collect();
            text.push_str(&stream.finish());
            proptest::prop_assert_eq!(text, t.decode(&ids, skip));
        }
    }
}
