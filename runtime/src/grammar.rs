//! Structured output: `response_format: {"type": "json_object"}` — the completion is one JSON
//! object (RFC 8259, as strictly as serde_json reads it: no control characters in strings, UTF-8
//! well formed, surrogate escapes in pairs, no leading zeros), then only whitespace and the end
//! token.
//!
//! [`Json`] is a byte-at-a-time pushdown automaton whose state is `Copy` (the stack of open
//! containers is a bit per level, at most [`MAX_DEPTH`] deep). [`JsonConstraint`] masks, before
//! each token is picked, every token whose bytes would take the output off the grammar: a walk
//! of the vocabulary's byte trie ([`TokenTrie`]: tokens sharing a prefix share its steps), cut
//! where a byte is refused. Special tokens are never allowed but the end token, and that only
//! once the object is closed.

use std::sync::Arc;

use v3c_models::sampling::Constraint;

use crate::tokenizer::Tokenizer;

/// The most containers open at once.
pub const MAX_DEPTH: u8 = 128;

/// Where a JSON text is, a byte at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Json {
    /// Open containers, innermost at bit `depth - 1`: 1 an array, 0 an object.
    stack: u128,
    depth: u8,
    at: At,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum At {
    /// Before the top-level object.
    Start,
    /// After `{`: a key or `}`.
    KeyOrClose,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After `:` or `,` in an array: a value.
    Value,
    /// After `[`: a value or `]`.
    ValueOrClose,
    /// After a value inside a container: `,` or its close.
    AfterValue,
    /// Inside a string (a key's when `key`).
    Str {
        key: bool,
        s: Str,
    },
    Number(Num),
    /// Inside `true`, `false` or `null`: the bytes still to come.
    Literal {
        rest: &'static [u8],
    },
    /// The top-level object closed: whitespace only.
    Done,
}

/// Inside a string: plain, after a backslash, in a `\u` escape (hex digits read so far, the
/// value so far, whether a low surrogate must follow), or in a UTF-8 character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Str {
    Plain,
    Escape {
        low: bool,
    },
    Hex {
        digits: u8,
        value: u16,
        low: bool,
    },
    /// A high surrogate's escape ended: `\` must come, then `u`, then a low surrogate.
    NeedBackslash,
    NeedU,
    /// `left` more continuation bytes, the next in `lo..=hi`.
    Utf8 {
        left: u8,
        lo: u8,
        hi: u8,
    },
}

/// Inside a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

fn whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Default for Json {
    fn default() -> Json {
        Json::new()
    }
}

impl Json {
    pub fn new() -> Json {
        Json { stack: 0, depth: 0, at: At::Start }
    }

    /// Whether the top-level object is closed.
    pub fn done(&self) -> bool {
        self.at == At::Done
    }

    fn in_array(&self) -> bool {
        self.depth > 0 && self.stack >> (self.depth - 1) & 1 == 1
    }

    fn open(mut self, array: bool) -> Option<Json> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        self.stack = (self.stack & !(1 << self.depth)) | (u128::from(array) << self.depth);
        self.depth += 1;
        self.at = if array { At::ValueOrClose } else { At::KeyOrClose };
        Some(self)
    }

    fn close(mut self, array: bool) -> Option<Json> {
        if self.depth == 0 || self.in_array() != array {
            return None;
        }
        self.depth -= 1;
        Some(self.value_ended())
    }

    /// A value ended: after it in its container, or the whole text's end.
    fn value_ended(mut self) -> Json {
        self.at = if self.depth == 0 { At::Done } else { At::AfterValue };
        self
    }

    /// A value's first byte.
    fn value(mut self, b: u8) -> Option<Json> {
        self.at = match b {
            b'{' => return self.open(false),
            b'[' => return self.open(true),
            b'"' => At::Str { key: false, s: Str::Plain },
            b'-' => At::Number(Num::Minus),
            b'0' => At::Number(Num::Zero),
            b'1'..=b'9' => At::Number(Num::Int),
            b't' => At::Literal { rest: b"rue" },
            b'f' => At::Literal { rest: b"alse" },
            b'n' => At::Literal { rest: b"ull" },
            _ => return None,
        };
        Some(self)
    }

    /// The state after byte `b`, or None where the grammar has no place for it.
    pub fn step(mut self, b: u8) -> Option<Json> {
        match self.at {
            At::Start if whitespace(b) => Some(self),
            At::Start => (b == b'{').then(|| self.open(false)).flatten(),
            At::KeyOrClose | At::Key | At::Colon | At::Value | At::ValueOrClose | At::AfterValue | At::Done
                if whitespace(b) =>
            {
                Some(self)
            }
            At::KeyOrClose if b == b'}' => self.close(false),
            At::KeyOrClose | At::Key if b == b'"' => {
                self.at = At::Str { key: true, s: Str::Plain };
                Some(self)
            }
            At::Colon if b == b':' => {
                self.at = At::Value;
                Some(self)
            }
            At::ValueOrClose if b == b']' => self.close(true),
            At::Value | At::ValueOrClose => self.value(b),
            At::AfterValue => match b {
                b',' => {
                    self.at = if self.in_array() { At::Value } else { At::Key };
                    Some(self)
                }
                b'}' => self.close(false),
                b']' => self.close(true),
                _ => None,
            },
            At::Str { key, s } => self.string(key, s, b),
            At::Number(n) => self.number(n, b),
            At::Literal { rest } => match rest {
                [c] if *c == b => Some(self.value_ended()),
                [c, more @ ..] if *c == b => {
                    self.at = At::Literal { rest: more };
                    Some(self)
                }
                _ => None,
            },
            _ => None,
        }
    }

    fn string(mut self, key: bool, s: Str, b: u8) -> Option<Json> {
        let next = match s {
            Str::Plain => match b {
                b'"' if key => {
                    self.at = At::Colon;
                    return Some(self);
                }
                b'"' => return Some(self.value_ended()),
                b'\\' => Str::Escape { low: false },
                0x00..=0x1f => return None,
                0x20..=0x7f => Str::Plain,
                0xc2..=0xdf => Str::Utf8 { left: 1, lo: 0x80, hi: 0xbf },
                0xe0 => Str::Utf8 { left: 2, lo: 0xa0, hi: 0xbf },
                0xe1..=0xec | 0xee..=0xef => Str::Utf8 { left: 2, lo: 0x80, hi: 0xbf },
                0xed => Str::Utf8 { left: 2, lo: 0x80, hi: 0x9f },
                0xf0 => Str::Utf8 { left: 3, lo: 0x90, hi: 0xbf },
                0xf1..=0xf3 => Str::Utf8 { left: 3, lo: 0x80, hi: 0xbf },
                0xf4 => Str::Utf8 { left: 3, lo: 0x80, hi: 0x8f },
                _ => return None,
            },
            Str::Utf8 { left, lo, hi } if (lo..=hi).contains(&b) => match left {
                1 => Str::Plain,
                _ => Str::Utf8 { left: left - 1, lo: 0x80, hi: 0xbf },
            },
            Str::Utf8 { .. } => return None,
            Str::Escape { low } => match b {
                b'u' => Str::Hex { digits: 0, value: 0, low },
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' if !low => Str::Plain,
                _ => return None,
            },
            Str::Hex { digits, value, low } => {
                let d = (b as char).to_digit(16)? as u16;
                let value = value << 4 | d;
                if digits < 3 {
                    Str::Hex { digits: digits + 1, value, low }
                } else {
                    match (low, value) {
                        (false, 0xd800..=0xdbff) => Str::NeedBackslash,
                        (false, 0xdc00..=0xdfff) => return None,
                        (false, _) => Str::Plain,
                        (true, 0xdc00..=0xdfff) => Str::Plain,
                        (true, _) => return None,
                    }
                }
            }
            Str::NeedBackslash if b == b'\\' => Str::NeedU,
            Str::NeedU if b == b'u' => Str::Hex { digits: 0, value: 0, low: true },
            Str::NeedBackslash | Str::NeedU => return None,
        };
        self.at = At::Str { key, s: next };
        Some(self)
    }

    fn number(mut self, n: Num, b: u8) -> Option<Json> {
        let next = match (n, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int,
            (Num::Int, b'0'..=b'9') => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::E,
            (Num::E, b'+' | b'-') => Num::ESign,
            (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Num::Exp,
            // A byte that cannot go on a complete number ends it and comes after it.
            (Num::Zero | Num::Int | Num::Frac | Num::Exp, _) => return self.value_ended().step(b),
            _ => return None,
        };
        self.at = At::Number(next);
        Some(self)
    }

    /// The state after `bytes`, or None where one is refused.
    pub fn feed(self, bytes: &[u8]) -> Option<Json> {
        bytes.iter().try_fold(self, |s, &b| s.step(b))
    }
}

/// The vocabulary's tokens by their bytes: a trie, each node a byte and the token ending there,
/// laid out in depth-first order (a node's subtree is the nodes after it up to its `end`).
pub struct TokenTrie {
    byte: Vec<u8>,
    /// The token ending at each node (u32::MAX: none).
    token: Vec<u32>,
    end: Vec<u32>,
    /// Where in a string a node's bytes leave a string they go on from a plain place in (None:
    /// they leave it, or are refused).
    path: Vec<Option<Str>>,
    /// Whether every byte below a node goes on inside such a string from there (no quote,
    /// backslash or control byte; UTF-8 well formed as far as it goes): then a walk that reaches
    /// the node at that place of a string allows its whole subtree without stepping through it.
    in_string: Vec<bool>,
    /// The tokens in node order, and how many end before each node (one more entry: all): a
    /// subtree's tokens are a range of `tokens`.
    tokens: Vec<u32>,
    before: Vec<u32>,
    vocab: usize,
    /// The special tokens walked as their text ([`TokenTrie::with`]).
    specials: Vec<u32>,
    /// Tokens never walked: the special ones and those with no bytes.
    pub left_out: usize,
    cache: std::sync::Mutex<std::collections::HashMap<Json, Arc<Vec<u64>>>>,
}

impl std::fmt::Debug for TokenTrie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenTrie({} nodes, {} tokens)", self.byte.len(), self.vocab)
    }
}

impl TokenTrie {
    /// The trie of `tokenizer`'s tokens but its special ones.
    pub fn of(tokenizer: &Tokenizer) -> TokenTrie {
        TokenTrie::with(tokenizer, &[])
    }

    /// The trie of a tokenizer's tokens with `specials` among them: those special tokens walked
    /// as their text (a tool call's markers, which a pattern spells).
    pub fn with(tokenizer: &Tokenizer, specials: &[u32]) -> TokenTrie {
        // Built as linked nodes (first child, next sibling; 0: none), then laid out.
        let (mut first, mut next, mut byte, mut token) = (vec![0u32], vec![0u32], vec![0u8], vec![u32::MAX]);
        let mut left_out = 0;
        for id in 0..tokenizer.vocab_size() as u32 {
            let bytes = tokenizer.token_bytes_of(id);
            if (tokenizer.is_special(id) && !specials.contains(&id)) || bytes.is_empty() {
                left_out += 1;
                continue;
            }
            let mut node = 0usize;
            for &b in &bytes {
                let mut c = first[node] as usize;
                while c != 0 && byte[c] != b {
                    c = next[c] as usize;
                }
                if c == 0 {
                    c = byte.len();
                    first.push(0);
                    next.push(first[node]);
                    byte.push(b);
                    token.push(u32::MAX);
                    first[node] = c as u32;
                }
                node = c;
            }
            token[node] = id;
        }
        let mut t = TokenTrie {
            byte: Vec::with_capacity(byte.len()),
            token: Vec::with_capacity(byte.len()),
            end: vec![0; byte.len()],
            path: vec![None; byte.len()],
            in_string: vec![false; byte.len()],
            tokens: Vec::new(),
            before: Vec::with_capacity(byte.len() + 1),
            vocab: tokenizer.vocab_size(),
            specials: specials.to_vec(),
            left_out,
            cache: Default::default(),
        };
        // Depth first: (linked node, its new index's parent chain closes as the walk leaves it).
        let mut todo = vec![(0usize, false)];
        let mut open = Vec::new();
        while let Some((n, leaving)) = todo.pop() {
            if leaving {
                let at = open.pop().expect("opened");
                t.end[at] = t.byte.len() as u32;
                continue;
            }
            open.push(t.byte.len());
            t.byte.push(byte[n]);
            t.token.push(token[n]);
            todo.push((n, true));
            let mut c = first[n] as usize;
            while c != 0 {
                todo.push((c, false));
                c = next[c] as usize;
            }
        }
        for &id in &t.token {
            t.before.push(t.tokens.len() as u32);
            if id != u32::MAX {
                t.tokens.push(id);
            }
        }
        t.before.push(t.tokens.len() as u32);
        let string = |s: Str| Json { stack: 0, depth: 1, at: At::Str { key: false, s } };
        t.path[0] = Some(Str::Plain);
        for n in 0..t.byte.len() {
            let Some(s) = t.path[n] else { continue };
            t.in_string[n] = t.stays_in_string(n, string(s));
            for c in t.children(n).collect::<Vec<_>>() {
                t.path[c] = match string(s).step(t.byte[c]).map(|j| j.at) {
                    Some(At::Str { s, .. }) => Some(s),
                    _ => None,
                };
            }
        }
        t
    }

    /// Node `n`'s children.
    fn children(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        let mut c = n + 1;
        std::iter::from_fn(move || {
            (c < self.end[n] as usize).then(|| {
                let at = c;
                c = self.end[c] as usize;
                at
            })
        })
    }

    /// Whether every path below node `n`, from `from`, stays inside the string.
    fn stays_in_string(&self, n: usize, from: Json) -> bool {
        let mut todo: Vec<(usize, Json)> = self.children(n).map(|c| (c, from)).collect();
        while let Some((c, state)) = todo.pop() {
            match state.step(self.byte[c]) {
                Some(s) if matches!(s.at, At::Str { .. }) => todo.extend(self.children(c).map(|d| (d, s))),
                _ => return false,
            }
        }
        true
    }

    /// Whether special token `id` is walked as its text ([`TokenTrie::with`]).
    pub fn walks(&self, id: u32) -> bool {
        self.specials.contains(&id)
    }

    /// How many nodes it has (with its address, what tells tries apart in kept masks).
    pub fn size(&self) -> usize {
        self.byte.len()
    }

    /// The tokens whose bytes take `from` on without a refusal, as a bit set (bit `id % 64` of
    /// word `id / 64`), walked afresh.
    pub fn walk(&self, from: Json) -> Vec<u64> {
        let whole = |n: usize, state: &Json| {
            matches!(state.at, At::Str { s, .. } if Some(s) == self.path[n]) && self.in_string[n]
        };
        self.walk_by(from, |s, b| s.step(b), whole)
    }

    /// The tokens whose bytes take `from` on by `step` without a refusal (a bit set as
    /// [`TokenTrie::walk`]'s); where `whole(node, state after it)`, the node's subtree is allowed
    /// without stepping through it.
    pub fn walk_by<S: Copy>(
        &self,
        from: S,
        step: impl Fn(S, u8) -> Option<S>,
        whole: impl Fn(usize, &S) -> bool,
    ) -> Vec<u64> {
        let mut ok = vec![0u64; self.vocab.div_ceil(64)];
        let mut mark = |t: u32| {
            if (t as usize) < self.vocab {
                ok[t as usize / 64] |= 1 << (t % 64);
            }
        };
        let mut todo: Vec<(usize, S)> = self.children(0).map(|c| (c, from)).collect();
        while let Some((n, state)) = todo.pop() {
            let Some(state) = step(state, self.byte[n]) else { continue };
            mark(self.token[n]);
            if whole(n, &state) {
                let below = self.before[n + 1] as usize..self.before[self.end[n] as usize] as usize;
                self.tokens[below].iter().for_each(|&t| mark(t));
            } else {
                todo.extend(self.children(n).map(|c| (c, state)));
            }
        }
        ok
    }

    /// [`TokenTrie::walk`], kept for the next time a sequence is in the same state (a long
    /// string's tokens are: its mask is walked once). At most [`CACHED`] states are kept, all
    /// dropped when a new one finds them full.
    pub fn allowed(&self, from: Json) -> Arc<Vec<u64>> {
        if let Some(ok) = self.cache.lock().ok().and_then(|c| c.get(&from).cloned()) {
            return ok;
        }
        let ok = Arc::new(self.walk(from));
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHED {
                cache.clear();
            }
            cache.insert(from, ok.clone());
        }
        ok
    }
}

/// The most states whose masks a trie keeps (16 KiB each for DeepSeek-V3's vocabulary).
pub const CACHED: usize = 512;

/// Sets the logits of the tokens not in bit set `ok` to -inf, but `end`'s (the end token is
/// special, never in the trie: allowed where the grammar may end, at its own logit).
pub(crate) fn keep_only(logits: &mut [f32], ok: &[u64], end: Option<u32>) {
    let end = end.and_then(|e| Some((e as usize, *logits.get(e as usize)?)));
    for (i, l) in logits.iter_mut().enumerate() {
        if !has(ok, i as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
    if let Some((e, l)) = end {
        logits[e] = l;
    }
}

/// Whether token `id` is in bit set `set`.
pub fn has(set: &[u64], id: u32) -> bool {
    set.get(id as usize / 64).is_some_and(|w| w >> (id % 64) & 1 == 1)
}

/// A byte automaton a completion is held to ([`Held`]): its states, and the tokens of a trie
/// that go on from one.
pub trait Automaton: Send + Sync + 'static {
    type State: Clone + std::fmt::Debug + Send + Sync + 'static;
    fn start(&self) -> Self::State;
    /// The state after byte `b`; None: refused.
    fn step(&self, s: &Self::State, b: u8) -> Option<Self::State>;
    /// Whether the completion may end in `s`.
    fn accepts(&self, s: &Self::State) -> bool;
    /// The tokens of `trie` whose bytes go on from `s` (a bit set).
    fn allowed(&self, trie: &TokenTrie, s: &Self::State) -> Arc<Vec<u64>>;
}

/// A sequence's completion held to an automaton: before each token, every token whose bytes it
/// refuses is masked, and the end token but where it accepts.
pub struct Held<A: Automaton> {
    automaton: Arc<A>,
    trie: Arc<TokenTrie>,
    tokenizer: Arc<Tokenizer>,
    eos: Option<u32>,
    state: A::State,
    /// A token took the output off the automaton (picked where nothing was masked).
    broken: bool,
}

impl<A: Automaton> Clone for Held<A> {
    fn clone(&self) -> Self {
        Held {
            automaton: self.automaton.clone(),
            trie: self.trie.clone(),
            tokenizer: self.tokenizer.clone(),
            eos: self.eos,
            state: self.state.clone(),
            broken: self.broken,
        }
    }
}

impl<A: Automaton> Held<A> {
    /// Held to `automaton` through `trie` (the tokenizer's, or one of
    /// [`Tokenizer::trie_with`]'s: special tokens the automaton spells are allowed as their text).
    pub fn walking(automaton: Arc<A>, trie: Arc<TokenTrie>, tokenizer: &Arc<Tokenizer>, eos: Option<u32>) -> Held<A> {
        let state = automaton.start();
        Held { automaton, trie, tokenizer: tokenizer.clone(), eos, state, broken: false }
    }

    pub fn state(&self) -> &A::State {
        &self.state
    }
}

impl<A: Automaton> std::fmt::Debug for Held<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = std::any::type_name::<A>().rsplit("::").next().unwrap_or("?");
        f.debug_struct(&format!("Held<{name}>")).field("state", &self.state).field("eos", &self.eos).finish()
    }
}

impl<A: Automaton> Constraint for Held<A> {
    fn mask(&self, logits: &mut [f32]) {
        if self.broken {
            return;
        }
        let ok = self.automaton.allowed(&self.trie, &self.state);
        // A state no token goes on from (what follows needs bytes the vocabulary does not spell)
        // ends the completion there: cut short, rather than a token picked from all -inf that
        // takes it off the automaton.
        let stuck = || ok.iter().all(|w| *w == 0);
        keep_only(logits, &ok, self.eos.filter(|_| self.automaton.accepts(&self.state) || stuck()));
    }

    fn advance(&mut self, token: u32) {
        if self.broken || Some(token) == self.eos {
            return;
        }
        let bytes = self.tokenizer.token_bytes_of(token);
        let next = bytes.iter().try_fold(self.state.clone(), |s, &b| self.automaton.step(&s, b));
        match next {
            Some(s) if !self.tokenizer.is_special(token) || self.trie.walks(token) => self.state = s,
            _ => self.broken = true,
        }
    }

    fn restart(&mut self) {
        (self.state, self.broken) = (self.automaton.start(), false);
    }

    fn boxed_clone(&self) -> Box<dyn Constraint> {
        Box::new(self.clone())
    }
}

/// JSON objects ([`Json`]'s automaton), as an [`Automaton`].
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonObject;

impl Automaton for JsonObject {
    type State = Json;

    fn start(&self) -> Json {
        Json::new()
    }

    fn step(&self, s: &Json, b: u8) -> Option<Json> {
        s.step(b)
    }

    fn accepts(&self, s: &Json) -> bool {
        s.done()
    }

    fn allowed(&self, trie: &TokenTrie, s: &Json) -> Arc<Vec<u64>> {
        trie.allowed(*s)
    }
}

/// A sequence's JSON object: the tokens its state allows, `eos` once it is closed.
pub type JsonConstraint = Held<JsonObject>;

impl Held<JsonObject> {
    pub fn new(tokenizer: &Arc<Tokenizer>, eos: Option<u32>) -> JsonConstraint {
        Held::walking(Arc::new(JsonObject), tokenizer.trie(), tokenizer, eos)
    }
}

/// A regular expression the whole completion must match (vLLM's `guided_regex`; `guided_choice`
/// is the alternation of its strings): a dense DFA over bytes (regex-automata), anchored at the
/// completion's start, whose states the trie is walked with; masks kept per state.
pub struct Pattern {
    dfa: regex_automata::dfa::dense::DFA<Vec<u32>>,
    start: regex_automata::util::primitives::StateID,
    /// By the trie walked (its address and size: a pattern may serve several tokenizers) and state.
    masks: std::sync::Mutex<std::collections::HashMap<MaskKey, Arc<Vec<u64>>>>,
}

/// A pattern's kept mask: the trie's address and size, and the DFA state.
type MaskKey = (usize, usize, regex_automata::util::primitives::StateID);

/// The most patterns [`Pattern::cached`] keeps.
pub const PATTERNS: usize = 32;

/// The largest DFA a pattern may build (bytes).
const PATTERN_BYTES: usize = 32 << 20;

impl Pattern {
    /// The pattern of `regex`, matched whole (a leading `^` and a trailing `$` change nothing).
    pub fn new(regex: &str) -> Result<Pattern, String> {
        use regex_automata::dfa::{dense, Automaton};
        let regex = regex.strip_prefix('^').unwrap_or(regex);
        let escaped = regex.ends_with("\\$") && !regex.ends_with("\\\\$");
        let regex = if escaped { regex } else { regex.strip_suffix('$').unwrap_or(regex) };
        use regex_automata::util::start;
        let config = dense::Config::new()
            .dfa_size_limit(Some(PATTERN_BYTES))
            .determinize_size_limit(Some(PATTERN_BYTES))
            .start_kind(regex_automata::dfa::StartKind::Anchored)
            // Every match, not the leftmost-first one: a match may go on to a longer one.
            .match_kind(regex_automata::MatchKind::All);
        // A match is only known one byte after it ends (the DFA's match states are delayed), by
        // which time any byte would have looked acceptable: the pattern is followed by a byte no
        // UTF-8 text holds, 0xFF, which ends it — so every other byte a state takes is one a match
        // may go on with.
        regex_automata::util::syntax::parse(regex).map_err(|e| e.to_string())?;
        let dfa = dense::Builder::new()
            .configure(config)
            .syntax(regex_automata::util::syntax::Config::new().utf8(false))
            .thompson(regex_automata::nfa::thompson::Config::new().utf8(false))
            .build(&format!("(?:{regex})(?-u:\\xFF)"))
            .map_err(|e| e.to_string())?;
        let anchored = start::Config::new().anchored(regex_automata::Anchored::Yes);
        let start = dfa.start_state(&anchored).map_err(|e| e.to_string())?;
        let pattern = Pattern { dfa, start, masks: Default::default() };
        // One that matches nothing (`[^\s\S]`) would leave a completion nothing to take.
        if !pattern.matches_something() {
            return Err("matches no text".into());
        }
        Ok(pattern)
    }

    /// Whether a match state is reachable from the start (the DFA's states walked breadth
    /// first: it is built whole, so this costs what building it did).
    fn matches_something(&self) -> bool {
        let mut seen = std::collections::HashSet::from([self.start]);
        let mut queue = std::collections::VecDeque::from([self.start]);
        while let Some(s) = queue.pop_front() {
            if self.matched(s) {
                return true;
            }
            for b in 0..=u8::MAX {
                if let Some(next) = self.step(s, b) {
                    if seen.insert(next) {
                        queue.push_back(next);
                    }
                }
            }
        }
        false
    }

    /// The state after byte `b`; None where nothing the pattern matches goes on so.
    fn step(
        &self,
        s: regex_automata::util::primitives::StateID,
        b: u8,
    ) -> Option<regex_automata::util::primitives::StateID> {
        use regex_automata::dfa::Automaton;
        let next = self.dfa.next_state(s, b);
        (b != 0xff && !self.dfa.is_dead_state(next) && !self.dfa.is_quit_state(next)).then_some(next)
    }

    /// Whether the bytes so far are a whole match.
    fn matched(&self, s: regex_automata::util::primitives::StateID) -> bool {
        use regex_automata::dfa::Automaton;
        self.dfa.is_match_state(self.dfa.next_eoi_state(self.dfa.next_state(s, 0xff)))
    }

    /// The pattern of `regex`, built once for every request that asks for it (a server's
    /// clients tend to send the same schema again and again; its masks are kept with it): the
    /// last [`PATTERNS`] regexes asked for are kept.
    pub fn cached(regex: &str) -> Result<Arc<Pattern>, String> {
        static KEPT: std::sync::Mutex<Vec<(String, Arc<Pattern>)>> = std::sync::Mutex::new(Vec::new());
        if let Some(p) = KEPT.lock().ok().and_then(|k| k.iter().find(|(r, _)| r == regex).map(|(_, p)| p.clone())) {
            return Ok(p);
        }
        let p = Arc::new(Pattern::new(regex)?);
        if let Ok(mut kept) = KEPT.lock() {
            if kept.len() >= PATTERNS {
                kept.remove(0);
            }
            kept.push((regex.to_string(), p.clone()));
        }
        Ok(p)
    }

    /// Whether the pattern matches `bytes` whole.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        bytes.iter().try_fold(self.start, |s, &b| self.step(s, b)).is_some_and(|s| self.matched(s))
    }

    /// The tokens of `trie` that go on after `prefix` (walked afresh; None: the prefix is off
    /// the pattern).
    pub fn walk_after(&self, trie: &TokenTrie, prefix: &[u8]) -> Option<Vec<u64>> {
        let s = prefix.iter().try_fold(self.start, |s, &b| self.step(s, b))?;
        Some(trie.walk_by(s, |s, b| self.step(s, b), |_, _| false))
    }

    /// The tokens of `trie` that go on from `s`, kept.
    fn allowed(&self, trie: &TokenTrie, s: regex_automata::util::primitives::StateID) -> Arc<Vec<u64>> {
        let key = (trie as *const TokenTrie as usize, trie.byte.len(), s);
        if let Some(ok) = self.masks.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return ok;
        }
        let ok = Arc::new(trie.walk_by(s, |s, b| self.step(s, b), |_, _| false));
        if let Ok(mut masks) = self.masks.lock() {
            if masks.len() >= CACHED {
                masks.clear();
            }
            masks.insert(key, ok.clone());
        }
        ok
    }
}

/// The regular expression matching exactly one of `choices` (vLLM's `guided_choice`).
pub fn choice_regex(choices: &[String]) -> String {
    choices.iter().map(|c| escape(c)).collect::<Vec<_>>().join("|")
}

/// `text` as a regular expression matching itself.
pub(crate) fn escape(text: &str) -> String {
    text.chars().fold(String::new(), |mut out, ch| {
        if "\\.+*?()|[]{}^$#&-~".contains(ch) {
            out.push('\\');
        }
        out.push(ch);
        out
    })
}

/// A sequence's completion held to a [`Pattern`]: the tokens that keep it a prefix of a match,
/// the end token once it is one (needed: with no end token, a finished match would leave nothing).
pub type PatternConstraint = Held<Pattern>;

impl Held<Pattern> {
    pub fn new(pattern: Arc<Pattern>, tokenizer: &Arc<Tokenizer>, eos: u32) -> PatternConstraint {
        Held::walking(pattern, tokenizer.trie(), tokenizer, Some(eos))
    }
}

impl Automaton for Pattern {
    type State = regex_automata::util::primitives::StateID;

    fn start(&self) -> Self::State {
        self.start
    }

    fn step(&self, s: &Self::State, b: u8) -> Option<Self::State> {
        Pattern::step(self, *s, b)
    }

    fn accepts(&self, s: &Self::State) -> bool {
        self.matched(*s)
    }

    fn allowed(&self, trie: &TokenTrie, s: &Self::State) -> Arc<Vec<u64>> {
        Pattern::allowed(self, trie, *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::schema_regex;
    use proptest::prelude::*;

    /// What serde_json makes of a text: an object, or not JSON at all (or not an object). A
    /// number past f64's range is JSON to the grammar (serde_json refuses to read it, Python's
    /// json reads infinity).
    fn serde_object(bytes: &[u8]) -> bool {
        match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(v) => v.is_object(),
            Err(e) => e.to_string().starts_with("number out of range") && accepts(bytes),
        }
    }

    fn accepts(bytes: &[u8]) -> bool {
        Json::new().feed(bytes).is_some_and(|s| s.done())
    }

    /// Samples up to `steps` tokens under `constraint` from random logits (seeded by `seed`, plus
    /// `lean[token]`): the completion's bytes, and whether the end token ended it.
    fn sample_constrained(
        t: &Tokenizer,
        constraint: Box<dyn Constraint>,
        eos: u32,
        seed: u64,
        steps: usize,
        lean: &[f32],
    ) -> (Vec<u8>, bool) {
        let mut sampler = v3c_models::reference::Sampler::new(1.0, 1.0, seed).constrained(constraint);
        sampler.start(&[]);
        let mut h = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut out = Vec::new();
        let bytes = |out: &[u32]| out.iter().flat_map(|&i| t.token_bytes_of(i)).collect::<Vec<u8>>();
        for _ in 0..steps {
            let row: Vec<f32> = (0..t.vocab_size())
                .map(|i| {
                    h = h.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((h >> 40) % 1000) as f32 / 250.0 + lean.get(i).copied().unwrap_or(0.0)
                })
                .collect();
            match sampler.sample(&row) {
                t if t == eos => return (bytes(&out), true),
                t => out.push(t),
            }
        }
        (bytes(&out), false)
    }

    fn fixture() -> Arc<Tokenizer> {
        crate::tokenizer::fixture::shared()
    }

    /// An automaton that takes nothing from its start, where it does not accept.
    struct Stuck;

    impl Automaton for Stuck {
        type State = ();
        fn start(&self) {}
        fn step(&self, _: &(), _: u8) -> Option<()> {
            None
        }
        fn accepts(&self, _: &()) -> bool {
            false
        }
        fn allowed(&self, _: &TokenTrie, _: &()) -> Arc<Vec<u64>> {
            Arc::new(vec![0; 4])
        }
    }

    /// Where no token goes on, the end token ends the completion; before, every logit was -inf,
    /// the first token was picked and the rest went unheld.
    #[test]
    fn a_state_no_token_goes_on_from_ends_the_completion() {
        let t = fixture();
        let eos = t.vocab_size() as u32 - 1;
        let held = Held::walking(Arc::new(Stuck), t.trie(), &t, Some(eos));
        let mut logits = vec![1.0f32; t.vocab_size()];
        held.mask(&mut logits);
        let left: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(left, [eos as usize]);
    }

    /// Hand-picked texts, each accepted exactly when serde_json reads it as an object.
    #[test]
    fn objects_are_what_serde_json_reads() {
        let cases: &[&[u8]] = &[
            b"{}",
            b" \t\r\n{ } \n",
            br#"{"a": 1, "b": [true, false, null, -0.5e+3, 0, 12, 1E9], "c": {"d": "e\u00e9\n\"\\\/\b\f\r\t"}}"#,
            r#"{"emoji": "\ud83d\ude00", "raw": "é😀日本"}"#.as_bytes(),
            br#"{"lone": "\ud83d"}"#,
            br#"{"lone": "\ude00"}"#,
            br#"{"pair": "\ud83d\u0041"}"#,
            br#"{"a": 01}"#,
            br#"{"a": 1.}"#,
            br#"{"a": .5}"#,
            br#"{"a": +1}"#,
            br#"{"a": -}"#,
            br#"{"a": 1e}"#,
            br#"{"a": [1,]}"#,
            br#"{"a": 1,}"#,
            br#"{"a" 1}"#,
            br#"{a: 1}"#,
            br#"{"a": tru}"#,
            br#"{"a": nul}"#,
            br#"{"a": "\x"}"#,
            br#"{"a": "\u12g4"}"#,
            b"{\"a\": \"tab\there\"}",
            b"{\"a\": \"\xc3\x28\"}",
            b"{\"a\": \"\xe0\x80\x80\"}",
            b"{\"a\": \"\xed\xa0\x80\"}",
            b"{\"a\": \"\xf4\x90\x80\x80\"}",
            b"{\"a\": \"\x7f\"}",
            b"[1, 2]",
            b"\"text\"",
            b"12",
            b"{} {}",
            b"{}}",
            b"{\"a\": [}",
            b"{\"a\": [[[[]]]]}",
        ];
        for &c in cases {
            assert_eq!(accepts(c), serde_object(c), "{}", String::from_utf8_lossy(c));
        }
        // Every prefix of an accepted text is on the way (None nowhere), and only the whole is done.
        let text = r#" {"k": [1.5e-3, {"x": "\ud83d\ude00é"}, null], "z": -0} "#.as_bytes();
        let mut s = Json::new();
        for (i, &b) in text.iter().enumerate() {
            s = s.step(b).unwrap_or_else(|| panic!("byte {i}"));
            assert_eq!(s.done(), i >= text.len() - 2, "byte {i}");
        }
    }

    #[test]
    fn nesting_stops_at_the_depth_limit() {
        let deep = |n: usize| [b"{\"a\":".to_vec(), "[".repeat(n - 1).into_bytes()].concat();
        assert!(Json::new().feed(&deep(MAX_DEPTH as usize)).is_some());
        assert!(Json::new().feed(&deep(MAX_DEPTH as usize + 1)).is_none());
        let closed = [b"{\"a\":".to_vec(), "[".repeat(100).into_bytes(), "]".repeat(100).into_bytes(), b"}".to_vec()];
        assert!(accepts(&closed.concat()));
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (-1e12f64..1e12).prop_map(serde_json::Value::from),
            any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(serde_json::Value::from),
            "\\PC{0,12}".prop_map(serde_json::Value::from),
            "[\\x00-\\x1f\"\\\\\u{7f}\u{e9}\u{1F600}]{0,6}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
                prop::collection::btree_map("\\PC{0,6}", inner, 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// serde_json's own objects, compact and pretty, are accepted; and a byte changed, put in
        /// or taken out anywhere, accepted exactly when serde_json still reads an object.
        #[test]
        fn serde_json_objects_and_their_mutations(
            fields in prop::collection::btree_map("\\PC{0,6}", json_value(), 0..5),
            pretty in any::<bool>(),
            at in any::<prop::sample::Index>(),
            byte in prop::sample::select(b"{}[]\",:.-+0123456789eEtrufalsn \\/u\xc3\xa9\xed\xa0\x80\x1fx".to_vec()),
            how in 0..3usize,
        ) {
            let v = serde_json::Value::Object(fields.into_iter().collect());
            let text = if pretty { serde_json::to_vec_pretty(&v) } else { serde_json::to_vec(&v) }.unwrap();
            prop_assert!(accepts(&text), "{}", String::from_utf8_lossy(&text));
            let mut m = text.clone();
            let i = at.index(m.len() + 1);
            match how {
                0 => m.insert(i, byte),
                1 if i < m.len() => { m.remove(i); }
                _ if i < m.len() => m[i] = byte,
                _ => m.push(byte),
            }
            prop_assert_eq!(accepts(&m), serde_object(&m), "{}", String::from_utf8_lossy(&m));
        }
    }

    /// The trie's walk allows exactly the tokens whose bytes feed the state without a refusal,
    /// in states along a text (strings, escapes, numbers, between values, done).
    #[test]
    fn the_tries_mask_is_each_tokens_own_feed() {
        let t = fixture();
        let trie = t.trie();
        assert_eq!(trie.left_out, (0..t.vocab_size() as u32).filter(|&i| t.is_special(i)).count());
        let text = r#"{"key \u00e9\ud83d\ude00": [12.5e-3, true, {"n": null}], "s": "café \"q\""} "#.as_bytes();
        let mut s = Json::new();
        let mut checked = 0;
        for (i, &b) in text.iter().enumerate() {
            if i % 3 == 0 || i > text.len() - 4 {
                let ok = trie.allowed(s);
                assert_eq!(trie.allowed(s), ok, "kept as walked");
                for id in 0..t.vocab_size() as u32 {
                    let want = !t.is_special(id) && s.feed(&t.token_bytes_of(id)).is_some();
                    assert_eq!(has(&ok, id), want, "byte {i}, token {id} {:?}", t.token(id));
                }
                assert!(ok.iter().any(|&x| x != 0), "byte {i}: something is allowed");
                checked += 1;
            }
            s = s.step(b).unwrap();
        }
        assert!(checked > 25, "{checked}");
    }

    /// Sampling from random logits under the constraint: every output is on the grammar, those
    /// that end with the end token are objects serde_json reads, the end token comes only then.
    #[test]
    fn constrained_sampling_writes_json_objects() {
        let t = fixture();
        let eos = t.token_id("<｜end▁of▁sentence｜>").unwrap();
        let vocab = t.vocab_size();
        // Tokens that close things a little likelier, so that objects end within the budget.
        let closing: Vec<f32> = (0..vocab as u32)
            .map(|i| {
                let b = t.token_bytes_of(i);
                if b.contains(&b'}') || b.contains(&b'"') || b.contains(&b']') {
                    2.0
                } else {
                    0.0
                }
            })
            .collect();
        let mut ended = 0;
        for seed in 0..40u64 {
            let c = Box::new(JsonConstraint::new(&t, Some(eos)));
            let (bytes, end) = sample_constrained(&t, c, eos, seed, 300, &closing);
            let state = Json::new().feed(&bytes);
            assert!(state.is_some(), "seed {seed}: {}", String::from_utf8_lossy(&bytes));
            if end {
                ended += 1;
                assert!(state.unwrap().done() && serde_object(&bytes), "{}", String::from_utf8_lossy(&bytes));
            }
        }
        assert!(ended >= 10, "{ended} of 40 closed their object");
    }

    /// A pattern's masks are each token's own feed through its DFA; choices match exactly
    /// themselves (their metacharacters literal).
    #[test]
    fn patterns_mask_what_keeps_a_match_possible() {
        let choice = Pattern::new(&choice_regex(&["yes".into(), "no".into(), "a.b (c)".into()])).unwrap();
        for (text, want) in
            [("yes", true), ("no", true), ("a.b (c)", true), ("axb (c)", false), ("ye", false), ("yess", false)]
        {
            assert_eq!(choice.matches(text.as_bytes()), want, "{text}");
        }
        let anchored = Pattern::new("^a+$").unwrap();
        assert!(anchored.matches(b"aaa") && !anchored.matches(b"") && !anchored.matches(b"ab"));
        assert!(Pattern::new("a\\$").unwrap().matches(b"a$"), "an escaped dollar is the pattern's");
        let t = fixture();
        let trie = t.trie();
        let p = Pattern::new(r"[0-9]{2,4}-(café|tea)\.( [A-Z][a-z]*)*").unwrap();
        let text = "2024-café. Hot Day".as_bytes();
        let mut s = p.start;
        for (i, &b) in text.iter().enumerate() {
            let ok = p.allowed(&trie, s);
            for id in 0..t.vocab_size() as u32 {
                let fed = t.token_bytes_of(id).iter().try_fold(s, |s, &b| p.step(s, b)).is_some();
                assert_eq!(has(&ok, id), !t.is_special(id) && fed, "byte {i}, token {id} {:?}", t.token(id));
            }
            s = p.step(s, b).unwrap();
        }
        assert!(p.matched(s) && p.matches(text));
        assert!(Pattern::new("(").err().unwrap().contains("unclosed group"), "the regex's own error");
        // Before, a completion held to these took the vocabulary's first token, then went on unheld.
        for empty in ["[^\\s\\S]", "a[^\\s\\S]b|[a&&b]"] {
            assert_eq!(Pattern::new(empty).err().unwrap(), "matches no text", "{empty}");
        }
        assert!(Pattern::new("a|[^\\s\\S]").is_ok(), "one alternative matches");
        let once = Pattern::cached("(ab)+c").unwrap();
        assert!(Arc::ptr_eq(&once, &Pattern::cached("(ab)+c").unwrap()), "built once");
        assert!(!Arc::ptr_eq(&once, &Pattern::cached("(ab)+d").unwrap()));
    }

    /// Sampling from random logits under a pattern: every completion that ends is a match, and
    /// ends only where it is one.
    #[test]
    fn constrained_sampling_matches_the_pattern() {
        let t = fixture();
        let eos = t.token_id("<｜end▁of▁sentence｜>").unwrap();
        let p = Arc::new(Pattern::new(r"(red|green|blue) [0-9]{1,3}( and (red|green|blue) [0-9]{1,3})?").unwrap());
        let mut ended = 0;
        for seed in 0..30u64 {
            let (bytes, end) =
                sample_constrained(&t, Box::new(PatternConstraint::new(p.clone(), &t, eos)), eos, seed, 60, &[]);
            assert!(end && p.matches(&bytes), "{}", String::from_utf8_lossy(&bytes));
            ended += usize::from(end);
        }
        assert_eq!(ended, 30, "every completion ends: the pattern is finite");
    }

    /// Sampling from random logits under a schema's pattern: every completion that ends is an
    /// instance serde_json reads, its properties in the schema's order.
    #[test]
    fn constrained_sampling_writes_schema_instances() {
        /// The members of a JSON object's text, repeated keys each counted.
        fn members(text: &[u8]) -> usize {
            struct Count(usize);
            impl<'de> serde::Deserialize<'de> for Count {
                fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    struct Members;
                    impl<'de> serde::de::Visitor<'de> for Members {
                        type Value = Count;
                        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                            f.write_str("an object")
                        }
                        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                            let mut n = 0;
                            while map.next_entry::<String, serde::de::IgnoredAny>()?.is_some() {
                                n += 1;
                            }
                            Ok(Count(n))
                        }
                    }
                    d.deserialize_map(Members)
                }
            }
            serde_json::from_slice::<Count>(text).unwrap().0
        }
        let t = fixture();
        let eos = t.token_id("<｜end▁of▁sentence｜>").unwrap();
        let schema = serde_json::json!({"type": "object", "properties": {
            "b": {"type": "boolean"}, "n": {"type": "integer"}, "c": {"enum": ["x", "y"]}},
            "required": ["b", "n", "c"]});
        let p = Arc::new(Pattern::new(&schema_regex(&schema).unwrap()).unwrap());
        // Whitespace and digits unlikelier, closing likelier: instances end within the budget.
        let lean: Vec<f32> = (0..t.vocab_size() as u32)
            .map(|i| {
                let b = t.token_bytes_of(i);
                match () {
                    _ if b.iter().all(u8::is_ascii_whitespace) => -6.0,
                    _ if b.iter().all(u8::is_ascii_digit) => -3.0,
                    _ if b.contains(&b'}') || b.contains(&b',') => 3.0,
                    _ => 0.0,
                }
            })
            .collect();
        let mut ended = 0;
        for seed in 0..20u64 {
            let c = Box::new(PatternConstraint::new(p.clone(), &t, eos));
            let (bytes, end) = sample_constrained(&t, c, eos, seed, 80, &lean);
            if end {
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
                assert_eq!(keys, ["b", "n", "c"], "{v}");
                assert!(v["b"].is_boolean() && v["n"].is_i64() && (v["c"] == "x" || v["c"] == "y"), "{v}");
                ended += 1;
            }
        }
        assert!(ended >= 10, "{ended} of 20 ended");
        // Other members beside the named one: each sampled instance's are booleans, keyed apart.
        let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}},
            "required": ["a"], "additionalProperties": {"type": "boolean"}});
        let p = Arc::new(Pattern::new(&schema_regex(&schema).unwrap()).unwrap());
        // Strings ending likelier too (the other keys are any strings).
        let lean: Vec<f32> = lean
            .iter()
            .enumerate()
            .map(|(i, &l)| l + 4.0 * t.token_bytes_of(i as u32).contains(&b'"') as u8 as f32)
            .collect();
        let (mut ended, mut others) = (0, 0);
        for seed in 0..20u64 {
            let c = Box::new(PatternConstraint::new(p.clone(), &t, eos));
            let (bytes, end) = sample_constrained(&t, c, eos, seed, 160, &lean);
            if end {
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let (first, rest) = v.as_object().unwrap().iter().partition::<Vec<_>, _>(|(k, _)| *k == "a");
                assert!(matches!(first[..], [(_, n)] if n.is_i64()), "{v}");
                assert!(rest.iter().all(|(_, b)| b.is_boolean()), "{v}");
                // Every member written is one serde_json keeps (no key twice).
                assert_eq!(members(&bytes), 1 + rest.len(), "{v}");
                (ended, others) = (ended + 1, others + rest.len());
            }
        }
        assert!(ended >= 10 && others > 0, "{ended} of 20 ended, {others} other members");
    }
}
