//! vLLM's `guided_grammar`: the completion is a sentence of a context-free grammar, written in
//! GBNF (llama.cpp's EBNF): `name ::= alternatives`, each a sequence of `"strings"`, `[classes]`
//! (`[^...]` negated, ranges `a-z`), `.` (any character), rule names and `( groups )`, each
//! followed or not by `*`, `+`, `?`, `{m}`, `{m,}` or `{m,n}`; `#` comments; the start rule is
//! `root`.
//!
//! Recognized a character at a time as llama.cpp's sampler does: the state is the set of the
//! parse's stacks (positions in the rules' sequences, the innermost last), each expanded until
//! its top expects a character; a byte at a time, the characters' UTF-8 decoded in the state.
//! Returning into a sequence that is over is not pushed (a tail call), so repetitions and right
//! recursion stay shallow; left recursion, which would expand for ever, is refused when the
//! grammar is read — unless its loops only ever make tail calls (a repetition of what may be
//! empty, `("a"?)*`), which expand each rule once. States are interned and their steps memoized, so the vocabulary's trie is
//! walked over a lazily built automaton (as [`crate::grammar::Pattern`]'s), its masks kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::grammar::{Automaton, Held, TokenTrie};
use crate::tokenizer::Tokenizer;

/// The most stacks a state may hold (an ambiguous grammar's parses multiply).
const MAX_STACKS: usize = 4096;
/// The most frames a stack may hold.
const MAX_DEPTH: usize = 512;
/// The most elements a grammar's repetitions may spell out.
const MAX_ELEMS: usize = 1 << 18;
/// The most states a grammar keeps interned (all dropped, and their masks, when full; the masks
/// alone are dropped past [`crate::grammar::CACHED`]).
const MAX_STATES: usize = 1 << 16;
/// The most steps a grammar keeps memoized (all dropped with the states when full).
const MAX_STEPS: usize = 1 << 20;

/// An element of a rule's sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Elem {
    /// One character within the ranges (inclusive), or outside them when negated.
    Chars(Vec<(u32, u32)>, bool),
    Rule(u32),
    /// The sequence is over.
    End,
}

/// A grammar, read and checked.
pub struct Grammar {
    /// Every alternative's sequence, each ended by [`Elem::End`].
    elems: Vec<Elem>,
    /// Each rule's alternatives: where their sequences start in `elems`.
    rules: Vec<Vec<u32>>,
    names: Vec<String>,
    root: u32,
    /// Whether rules may reach themselves without a character read or a return address pushed
    /// (`("a"?)*`): expansions then note the rules they expanded, to expand each once.
    loops: bool,
    machine: Mutex<Machine>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grammar({} rules)", self.rules.len())
    }
}

/// Where a parse is: its stacks (sorted; each a list of positions in `elems`, the top last,
/// pointing at a character; an empty one: the root is complete), and the character being read
/// (`need` more UTF-8 bytes to `code`'s bits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    stacks: Vec<Vec<u32>>,
    need: u8,
    code: u32,
    /// The least character the bytes read so far may spell (longer spellings are refused).
    least: u32,
}

/// Interned states, their steps and their masks.
#[derive(Default)]
struct Machine {
    states: Vec<Arc<State>>,
    index: HashMap<Arc<State>, u32>,
    /// (state, byte) -> the state after it (u32::MAX: refused).
    steps: HashMap<(u32, u8), u32>,
    /// (trie address, trie size, state) -> the tokens allowed.
    masks: HashMap<(usize, usize, u32), Arc<Vec<u64>>>,
}

impl Machine {
    fn intern(&mut self, s: State) -> u32 {
        if let Some(&id) = self.index.get(&s) {
            return id;
        }
        let id = self.states.len() as u32;
        let s = Arc::new(s);
        self.states.push(s.clone());
        self.index.insert(s, id);
        id
    }
}

/// Whether a class matches no character: `[]`, or `[^...]` of ranges that cover every scalar
/// value (surrogates aside: no UTF-8 text holds them).
fn no_char(ranges: &[(u32, u32)], negated: bool) -> bool {
    if !negated {
        return ranges.is_empty();
    }
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    // The first character not yet covered, going up.
    let mut next = 0u32;
    for (lo, hi) in sorted {
        if lo > next {
            break;
        }
        next = next.max(hi.saturating_add(1));
        if next == 0xD800 {
            next = 0xE000;
        }
    }
    next > 0x10FFFF
}

impl Grammar {
    /// Reads a grammar in GBNF; errors say where and what.
    pub fn parse(text: &str) -> Result<Grammar, String> {
        let mut p =
            Parser { text: text.as_bytes(), at: 0, rules: Vec::new(), names: Vec::new(), defined: Vec::new(), size: 0 };
        p.grammar()?;
        let Parser { rules, names, defined, .. } = p;
        if let Some(k) = defined.iter().position(|d| !d) {
            return Err(format!("rule {} is used but not defined", names[k]));
        }
        let root = names.iter().position(|n| n == "root").ok_or("no rule named root")? as u32;
        let mut elems = Vec::new();
        let mut starts = Vec::with_capacity(rules.len());
        for alts in &rules {
            let mut mine = Vec::with_capacity(alts.len());
            for seq in alts {
                mine.push(elems.len() as u32);
                elems.extend(seq.iter().cloned());
                elems.push(Elem::End);
            }
            starts.push(mine);
        }
        let mut g = Grammar { elems, rules: starts, names, root, loops: false, machine: Mutex::default() };
        g.loops = g.refuse_left_recursion()?;
        g.refuse_endless_rules()?;
        Ok(g)
    }

    /// A rule whose every alternative needs a rule that never ends (itself: `root ::= "a" root`,
    /// `root ::= root`) matches no finite text: a completion held to it could never stop, and
    /// one at a state with nothing left to take would go on unheld. Refused, naming the rule the
    /// root reaches first and the rules it must go through (each one's first alternative's first
    /// such rule) until one repeats.
    fn refuse_endless_rules(&self) -> Result<(), String> {
        let n = self.rules.len();
        let ends = self.rules_where(|a, ends| self.endless_in(a, ends).is_none());
        // The rules the root reaches, breadth first.
        let mut seen = vec![false; n];
        let mut queue = std::collections::VecDeque::from([self.root]);
        seen[self.root as usize] = true;
        while let Some(r) = queue.pop_front() {
            if !ends[r as usize] {
                let mut path = vec![r];
                while let Some(next) =
                    self.rules[path[path.len() - 1] as usize].first().and_then(|&a| self.endless_in(a as usize, &ends))
                {
                    path.push(next);
                    if path[..path.len() - 1].contains(&next) {
                        break;
                    }
                }
                let names: Vec<&str> = path.iter().map(|&k| self.names[k as usize].as_str()).collect();
                return Err(format!(
                    "rule {} matches no finite text: each of its alternatives needs a rule that never ends ({})",
                    names[0],
                    names.join(" -> ")
                ));
            }
            for &a in &self.rules[r as usize] {
                for e in self.elems[a as usize..].iter().take_while(|e| **e != Elem::End) {
                    if let Elem::Rule(b) = e {
                        if !std::mem::replace(&mut seen[*b as usize], true) {
                            queue.push_back(*b);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The rules with an alternative for which `holds` (given where it starts in `elems`, and what
    /// is known so far of every rule) — the least such set, grown until it stops growing.
    fn rules_where(&self, holds: impl Fn(usize, &[bool]) -> bool) -> Vec<bool> {
        let mut known = vec![false; self.rules.len()];
        loop {
            let mut changed = false;
            for r in 0..self.rules.len() {
                if !known[r] && self.rules[r].iter().any(|&a| holds(a as usize, &known)) {
                    known[r] = true;
                    changed = true;
                }
            }
            if !changed {
                return known;
            }
        }
    }

    /// The first rule of the sequence at `p` that cannot end (as `ends` knows so far), if any.
    fn endless_in(&self, p: usize, ends: &[bool]) -> Option<u32> {
        self.elems[p..].iter().take_while(|e| **e != Elem::End).find_map(|e| match e {
            Elem::Rule(r) if !ends[*r as usize] => Some(*r),
            _ => None,
        })
    }

    /// A rule that may begin with itself (through rules that may match nothing) with something
    /// after it would expand for ever, its stack growing: refused, naming the loop. Loops whose
    /// every step is a sequence's last element (`("a"?)*`: R ::= "a"? R | ...) do not grow the
    /// stack: they are kept, and the grammar marked to expand them once (see [`Grammar::expand`]).
    /// Returns whether there are such loops.
    fn refuse_left_recursion(&self) -> Result<bool, String> {
        let n = self.rules.len();
        // Which rules may match nothing.
        let nullable = self.rules_where(|a, nullable| self.nullable_from(a, nullable));
        // Each rule's left corners: the rules its alternatives may begin with, and whether each
        // is the last of its sequence (nothing to return to).
        let corners: Vec<Vec<(u32, bool)>> = (0..n)
            .map(|r| {
                let mut out = Vec::new();
                for &a in &self.rules[r] {
                    let mut p = a as usize;
                    while let Elem::Rule(b) = self.elems[p] {
                        out.push((b, self.elems[p + 1] == Elem::End));
                        if !nullable[b as usize] {
                            break;
                        }
                        p += 1;
                    }
                }
                out
            })
            .collect();
        let edges: Vec<Vec<u32>> = corners.iter().map(|c| c.iter().map(|&(b, _)| b).collect()).collect();
        let component = components(&edges);
        let mut loops = false;
        for (r, c) in corners.iter().enumerate() {
            for &(b, last) in c {
                if component[b as usize] != component[r] {
                    continue;
                }
                if last {
                    loops = true;
                    continue;
                }
                // A loop through r -> b: the way back from b to r, breadth first.
                let mut from = vec![u32::MAX; n];
                let mut queue = std::collections::VecDeque::from([b]);
                from[b as usize] = b;
                while let Some(x) = queue.pop_front() {
                    for &y in &edges[x as usize] {
                        if from[y as usize] == u32::MAX && component[y as usize] == component[r] {
                            from[y as usize] = x;
                            queue.push_back(y);
                        }
                    }
                }
                let mut path = vec![r as u32];
                let mut x = r as u32;
                while x != b {
                    x = from[x as usize];
                    path.push(x);
                }
                path.push(r as u32);
                path.reverse();
                let names: Vec<&str> = path.iter().map(|&k| self.names[k as usize].as_str()).collect();
                return Err(format!("rule {} is left-recursive ({})", names[0], names.join(" -> ")));
            }
        }
        Ok(loops)
    }

    fn nullable_from(&self, mut p: usize, nullable: &[bool]) -> bool {
        loop {
            match &self.elems[p] {
                Elem::End => return true,
                Elem::Chars(..) => return false,
                Elem::Rule(r) if nullable[*r as usize] => p += 1,
                Elem::Rule(_) => return false,
            }
        }
    }

    /// Where every completion starts.
    pub fn start(&self) -> State {
        let mut stacks = Vec::new();
        for &a in &self.rules[self.root as usize] {
            self.expand(vec![a], &mut stacks);
        }
        stacks.sort();
        stacks.dedup();
        State { stacks, need: 0, code: 0, least: 0 }
    }

    /// `stack` expanded until its top expects a character (or it is empty: complete), into `out`.
    fn expand(&self, stack: Vec<u32>, out: &mut Vec<Vec<u32>>) {
        let mut expanded = self.loops.then(std::collections::HashSet::new);
        self.expand_noting(stack, out, &mut expanded);
    }

    /// [`Grammar::expand`], each rule expanded once over the same stack below it where
    /// `expanded` notes them.
    fn expand_noting(
        &self,
        mut stack: Vec<u32>,
        out: &mut Vec<Vec<u32>>,
        expanded: &mut Option<std::collections::HashSet<(Vec<u32>, u32)>>,
    ) {
        if stack.len() > MAX_DEPTH || out.len() > MAX_STACKS {
            return;
        }
        let Some(&top) = stack.last() else {
            out.push(stack);
            return;
        };
        match &self.elems[top as usize] {
            Elem::Chars(..) => out.push(stack),
            Elem::End => {
                stack.pop();
                self.expand_noting(stack, out, expanded);
            }
            Elem::Rule(r) => {
                stack.pop();
                // The return address, unless returning would end the sequence anyway.
                if self.elems[top as usize + 1] != Elem::End {
                    stack.push(top + 1);
                }
                if let Some(expanded) = expanded {
                    if !expanded.insert((stack.clone(), *r)) {
                        return;
                    }
                }
                for &a in &self.rules[*r as usize] {
                    let mut s = stack.clone();
                    s.push(a);
                    self.expand_noting(s, out, expanded);
                }
            }
        }
    }

    /// The state after byte `b`; None: refused.
    pub fn step(&self, s: &State, b: u8) -> Option<State> {
        let (need, code, least) = match (s.need, b) {
            (0, 0x00..=0x7f) => (0, b as u32, 0),
            (0, 0xc2..=0xdf) => (1, (b & 0x1f) as u32, 0x80),
            (0, 0xe0..=0xef) => (2, (b & 0x0f) as u32, 0x800),
            (0, 0xf0..=0xf4) => (3, (b & 0x07) as u32, 0x10000),
            (0, _) => return None,
            (n, 0x80..=0xbf) => (n - 1, s.code << 6 | (b & 0x3f) as u32, s.least),
            _ => return None,
        };
        if need > 0 {
            // Part of a character: only if some stack takes a character these bytes begin.
            let shift = 6 * need as u32;
            let (lo, hi) = ((code << shift).max(least), (code << shift | ((1 << shift) - 1)).min(0x10ffff));
            let takes = s.stacks.iter().any(|stack| match stack.last().map(|&p| &self.elems[p as usize]) {
                Some(Elem::Chars(ranges, negated)) => overlaps(ranges, *negated, lo, hi),
                _ => false,
            });
            return takes.then(|| State { need, code, least, ..s.clone() });
        }
        // Well formed: not spelled longer than it needs, not a surrogate, not past U+10FFFF.
        if code < least {
            return None;
        }
        let c = char::from_u32(code)? as u32;
        let mut stacks = Vec::new();
        for stack in &s.stacks {
            let Some(&top) = stack.last() else { continue };
            let Elem::Chars(ranges, negated) = &self.elems[top as usize] else { continue };
            if ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&c)) != *negated {
                let mut next = stack.clone();
                *next.last_mut()? += 1;
                self.expand(next, &mut stacks);
            }
        }
        if stacks.is_empty() || stacks.len() > MAX_STACKS {
            return None;
        }
        stacks.sort();
        stacks.dedup();
        Some(State { stacks, need: 0, code: 0, least: 0 })
    }

    /// Whether `s` has read a whole sentence.
    pub fn accepts(&self, s: &State) -> bool {
        s.need == 0 && s.stacks.iter().any(Vec::is_empty)
    }

    /// Whether `text` is a sentence.
    pub fn matches(&self, text: &[u8]) -> bool {
        text.iter().try_fold(self.start(), |s, &b| self.step(&s, b)).is_some_and(|s| self.accepts(&s))
    }

    /// The tokens of `trie` that go on from `s` (kept per state).
    pub fn allowed(&self, trie: &TokenTrie, s: &State) -> Arc<Vec<u64>> {
        let mut m = self.machine.lock().unwrap_or_else(|e| e.into_inner());
        if m.states.len() > MAX_STATES || m.steps.len() > MAX_STEPS {
            *m = Machine::default();
        }
        let id = m.intern(s.clone());
        let key = (trie as *const TokenTrie as usize, trie.size(), id);
        if let Some(ok) = m.masks.get(&key) {
            return ok.clone();
        }
        let machine = std::cell::RefCell::new(&mut *m);
        let step = |id: u32, b: u8| -> Option<u32> {
            let mut m = machine.borrow_mut();
            if let Some(&next) = m.steps.get(&(id, b)) {
                return (next != u32::MAX).then_some(next);
            }
            let state = m.states[id as usize].clone();
            let next = self.step(&state, b).map(|s| m.intern(s));
            m.steps.insert((id, b), next.unwrap_or(u32::MAX));
            next
        };
        let ok = Arc::new(trie.walk_by(id, step, |_, _| false));
        // At most as many masks kept as a trie keeps (16 KiB each for DeepSeek-V3's vocabulary).
        if m.masks.len() >= crate::grammar::CACHED {
            m.masks.clear();
        }
        m.masks.insert(key, ok.clone());
        ok
    }
}

/// The strongly connected components of a graph: each node's component (Kosaraju's, without
/// recursion: grammars spelling out repetitions may chain thousands of rules).
fn components(edges: &[Vec<u32>]) -> Vec<u32> {
    let n = edges.len();
    // Nodes in the order their depth-first visits finish.
    let mut order = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    for root in 0..n {
        if seen[root] {
            continue;
        }
        seen[root] = true;
        let mut stack = vec![(root, 0usize)];
        while let Some((x, i)) = stack.pop() {
            match edges[x].get(i) {
                Some(&y) => {
                    stack.push((x, i + 1));
                    if !seen[y as usize] {
                        seen[y as usize] = true;
                        stack.push((y as usize, 0));
                    }
                }
                None => order.push(x),
            }
        }
    }
    let mut back = vec![Vec::new(); n];
    for (x, out) in edges.iter().enumerate() {
        for &y in out {
            back[y as usize].push(x as u32);
        }
    }
    // On the reversed graph, latest finished first: each search stays in one component.
    let mut component = vec![u32::MAX; n];
    let mut count = 0;
    for &root in order.iter().rev() {
        if component[root] != u32::MAX {
            continue;
        }
        component[root] = count;
        let mut stack = vec![root];
        while let Some(x) = stack.pop() {
            for &y in &back[x] {
                if component[y as usize] == u32::MAX {
                    component[y as usize] = count;
                    stack.push(y as usize);
                }
            }
        }
        count += 1;
    }
    component
}

/// Whether a class (`ranges`, or what is outside them when `negated`) holds a character from
/// `lo` to `hi`.
fn overlaps(ranges: &[(u32, u32)], negated: bool, lo: u32, hi: u32) -> bool {
    if !negated {
        return ranges.iter().any(|&(a, b)| a <= hi && lo <= b);
    }
    // Some character of lo..=hi outside every range: walk up from lo past the ranges covering it.
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut at = lo;
    for (a, b) in sorted {
        if a > at {
            break;
        }
        if b >= at {
            match b.checked_add(1) {
                Some(n) => at = n,
                None => return false,
            }
        }
    }
    at <= hi
}

/// A sequence's completion held to a grammar: the tokens that keep it a prefix of a sentence,
/// the end token once it is one.
pub type GrammarConstraint = Held<Grammar>;

impl Held<Grammar> {
    pub fn new(grammar: Arc<Grammar>, tokenizer: &Arc<Tokenizer>, eos: u32) -> GrammarConstraint {
        Held::walking(grammar, tokenizer.trie(), tokenizer, Some(eos))
    }
}

impl Automaton for Grammar {
    type State = State;

    fn start(&self) -> State {
        Grammar::start(self)
    }

    fn step(&self, s: &State, b: u8) -> Option<State> {
        Grammar::step(self, s, b)
    }

    fn accepts(&self, s: &State) -> bool {
        Grammar::accepts(self, s)
    }

    fn allowed(&self, trie: &TokenTrie, s: &State) -> Arc<Vec<u64>> {
        Grammar::allowed(self, trie, s)
    }
}

/// An item of a sequence while reading: characters, or a rule by its number.
type Seq = Vec<Elem>;

/// A recursive-descent reader of GBNF.
struct Parser<'t> {
    text: &'t [u8],
    at: usize,
    /// Each rule's alternatives (rules numbered as first named; groups and repetitions get
    /// rules of their own).
    rules: Vec<Vec<Seq>>,
    names: Vec<String>,
    defined: Vec<bool>,
    /// Elements the repetitions have spelled so far.
    size: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> String {
        let line = self.text[..self.at].iter().filter(|&&b| b == b'\n').count() + 1;
        let col = self.at - self.text[..self.at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
        format!("line {line}, column {col}: {what}")
    }

    fn space(&mut self) {
        while self.at < self.text.len() {
            match self.text[self.at] {
                b' ' | b'\t' | b'\r' | b'\n' => self.at += 1,
                b'#' => {
                    while self.at < self.text.len() && self.text[self.at] != b'\n' {
                        self.at += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn name(&mut self) -> Option<String> {
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
            self.at += 1;
        }
        (self.at > start).then(|| String::from_utf8_lossy(&self.text[start..self.at]).into_owned())
    }

    fn rule_of(&mut self, name: &str) -> u32 {
        match self.names.iter().position(|n| n == name) {
            Some(k) => k as u32,
            None => {
                self.names.push(name.to_string());
                self.rules.push(Vec::new());
                self.defined.push(false);
                (self.names.len() - 1) as u32
            }
        }
    }

    /// A new rule of its own (a group's, a repetition's), named after `base`.
    fn anonymous(&mut self, base: &str, alts: Vec<Seq>) -> u32 {
        let name = format!("{base}-{}", self.names.len());
        let r = self.rule_of(&name);
        self.rules[r as usize] = alts;
        self.defined[r as usize] = true;
        r
    }

    fn grammar(&mut self) -> Result<(), String> {
        self.space();
        if self.at >= self.text.len() {
            return Err("an empty grammar".into());
        }
        while self.at < self.text.len() {
            let start = self.at;
            let name = self.name().ok_or_else(|| self.error("expected a rule's name"))?;
            self.space();
            if !self.text[self.at..].starts_with(b"::=") {
                return Err(self.error(&format!("expected ::= after {name}")));
            }
            let r = self.rule_of(&name);
            if self.defined[r as usize] {
                self.at = start;
                return Err(self.error(&format!("rule {name} is defined twice")));
            }
            self.at += 3;
            self.defined[r as usize] = true;
            let alts = self.alternatives(&name, 0)?;
            self.rules[r as usize] = alts;
            self.space();
        }
        Ok(())
    }

    fn alternatives(&mut self, rule: &str, depth: usize) -> Result<Vec<Seq>, String> {
        if depth > 64 {
            return Err(self.error("groups nested more than 64 deep"));
        }
        let mut alts = vec![self.sequence(rule, depth)?];
        while self.peek() == Some(b'|') {
            self.at += 1;
            alts.push(self.sequence(rule, depth)?);
        }
        Ok(alts)
    }

    /// Items up to `|`, `)`, the next rule (`name ::=`) or the end.
    fn sequence(&mut self, rule: &str, depth: usize) -> Result<Seq, String> {
        let mut seq = Vec::new();
        loop {
            self.space();
            let Some(c) = self.peek() else { break };
            if c == b'|' || c == b')' {
                break;
            }
            // The next rule's name?
            let mark = self.at;
            if let Some(_name) = self.name() {
                self.space();
                let next_rule = self.text[self.at..].starts_with(b"::=");
                self.at = mark;
                if next_rule {
                    break;
                }
            }
            let item = self.primary(rule, depth)?;
            self.space();
            let item = self.repeated(rule, item)?;
            seq.extend(item);
        }
        Ok(seq)
    }

    fn primary(&mut self, rule: &str, depth: usize) -> Result<Seq, String> {
        match self.peek() {
            Some(b'"') => {
                self.at += 1;
                let mut seq = Vec::new();
                loop {
                    match self.peek() {
                        None => return Err(self.error("a string that does not end")),
                        Some(b'"') => {
                            self.at += 1;
                            return Ok(seq);
                        }
                        Some(_) => {
                            let c = self.char()?;
                            seq.push(Elem::Chars(vec![(c, c)], false));
                        }
                    }
                }
            }
            Some(b'[') => {
                let start = self.at;
                self.at += 1;
                let negated = self.peek() == Some(b'^');
                if negated {
                    self.at += 1;
                }
                let mut ranges = Vec::new();
                loop {
                    match self.peek() {
                        None => return Err(self.error("a class that does not end")),
                        Some(b']') if no_char(&ranges, negated) => {
                            self.at = start;
                            return Err(self.error("a class that matches no character"));
                        }
                        Some(b']') => {
                            self.at += 1;
                            return Ok(vec![Elem::Chars(ranges, negated)]);
                        }
                        Some(_) => {
                            let lo = self.char()?;
                            let hi = if self.peek() == Some(b'-') && self.text.get(self.at + 1) != Some(&b']') {
                                self.at += 1;
                                self.char()?
                            } else {
                                lo
                            };
                            if hi < lo {
                                return Err(self.error("a range that runs backwards"));
                            }
                            ranges.push((lo, hi));
                        }
                    }
                }
            }
            Some(b'.') => {
                self.at += 1;
                Ok(vec![Elem::Chars(Vec::new(), true)])
            }
            Some(b'(') => {
                self.at += 1;
                let alts = self.alternatives(rule, depth + 1)?;
                self.space();
                if self.peek() != Some(b')') {
                    return Err(self.error("expected )"));
                }
                self.at += 1;
                Ok(vec![Elem::Rule(self.anonymous(rule, alts))])
            }
            Some(c) if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' => {
                let name = self.name().unwrap_or_default();
                Ok(vec![Elem::Rule(self.rule_of(&name))])
            }
            _ => Err(self.error("expected a string, a class, a name, . or (")),
        }
    }

    /// One character of a string or class: itself, or an escape.
    fn char(&mut self) -> Result<u32, String> {
        let rest = std::str::from_utf8(&self.text[self.at..]).map_err(|_| self.error("not UTF-8"))?;
        let mut chars = rest.chars();
        let c = chars.next().ok_or_else(|| self.error("unexpected end"))?;
        self.at += c.len_utf8();
        if c != '\\' {
            return Ok(c as u32);
        }
        let e = chars.next().ok_or_else(|| self.error("an escape that does not end"))?;
        self.at += e.len_utf8();
        let hex = |p: &mut Self, n: usize| -> Result<u32, String> {
            let digits = p.text.get(p.at..p.at + n).and_then(|d| std::str::from_utf8(d).ok()).unwrap_or("");
            let v = u32::from_str_radix(digits, 16).map_err(|_| p.error(&format!("expected {n} hex digits")))?;
            p.at += n;
            char::from_u32(v).map(|c| c as u32).ok_or_else(|| p.error("not a character"))
        };
        Ok(match e {
            'n' => '\n' as u32,
            'r' => '\r' as u32,
            't' => '\t' as u32,
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            '\\' | '"' | '[' | ']' | '-' | '^' => e as u32,
            _ => return Err(self.error(&format!("unknown escape \\{e}"))),
        })
    }

    /// `item` with the repetition that follows it, if any.
    fn repeated(&mut self, rule: &str, item: Seq) -> Result<Seq, String> {
        let (min, max) = match self.peek() {
            Some(b'*') => (0, None),
            Some(b'+') => (1, None),
            Some(b'?') => (0, Some(1)),
            Some(b'{') => {
                let close =
                    self.text[self.at..].iter().position(|&b| b == b'}').ok_or_else(|| self.error("expected }"))?;
                let inner = String::from_utf8_lossy(&self.text[self.at + 1..self.at + close]).replace(' ', "");
                let bound =
                    |s: &str| s.parse::<usize>().map_err(|_| self.error(&format!("{{{inner}}} is not a count")));
                let (min, max) = match inner.split_once(',') {
                    None => (bound(&inner)?, Some(bound(&inner)?)),
                    Some((m, "")) => (bound(m)?, None),
                    Some((m, n)) => (bound(m)?, Some(bound(n)?)),
                };
                if max.is_some_and(|n| n < min) || min > 1024 || max.is_some_and(|n| n > 1024) {
                    return Err(self.error(&format!("{{{inner}}}: counts up to 1024, the least first")));
                }
                self.at += close;
                (min, max)
            }
            _ => return Ok(item),
        };
        self.at += 1;
        // Copies of the item: bounded, so that nested counts cannot make a grammar of millions.
        let copies = item.len().max(1) * max.unwrap_or(min).max(1);
        self.size += copies;
        if copies > MAX_ELEMS || self.size > MAX_ELEMS {
            return Err(self.error(&format!("repetitions spell more than {MAX_ELEMS} elements")));
        }
        let mut seq: Seq = Vec::new();
        for _ in 0..min {
            seq.extend(item.iter().cloned());
        }
        match max {
            // Any more: R ::= item R | (nothing).
            None => {
                let r = self.anonymous(rule, Vec::new());
                self.rules[r as usize] = vec![[&item[..], &[Elem::Rule(r)]].concat(), Vec::new()];
                seq.push(Elem::Rule(r));
            }
            // Up to max - min more, each optional after the one before: (item (item ...)?)?.
            Some(max) => {
                let mut tail: Option<u32> = None;
                for _ in min..max {
                    let mut inner = item.clone();
                    inner.extend(tail.map(Elem::Rule));
                    tail = Some(self.anonymous(rule, vec![inner, Vec::new()]));
                }
                seq.extend(tail.map(Elem::Rule));
            }
        }
        Ok(seq)
    }
}

/// `text` as a GBNF string: a quote, a backslash and control characters escaped.
pub fn quote(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON schema whose references are recursive as a GBNF grammar (None: it has none — a
/// regular expression holds it, [`crate::schema::schema_regex`]): [`schema_rules`] under
/// `root`.
pub fn schema_grammar(schema: &serde_json::Value) -> Result<Option<String>, String> {
    let (rules, recursive) = schema_rules(schema, "root")?;
    Ok(recursive.then_some(rules))
}

/// A JSON schema's texts as GBNF rules: rule `name`, and each schema it refers to as
/// `name-ref-k` ([`crate::schema::schema_rules`]'s expressions written in GBNF); and whether
/// its references recurse.
pub fn schema_rules(schema: &serde_json::Value, name: &str) -> Result<(String, bool), String> {
    let (rules, recursive) = crate::schema::schema_rules(schema)?;
    let mut text = String::new();
    for (k, regex) in rules.iter().enumerate() {
        let rule = if k == 0 { name.to_string() } else { format!("{name}-ref-{}", k - 1) };
        if regex == crate::schema::ANY_OBJECT {
            text.push_str(&any_object_rules(&rule));
            continue;
        }
        if regex == crate::schema::ANY_VALUE {
            text.push_str(&any_json_rules(&rule, "value"));
            continue;
        }
        let hir = regex_syntax::Parser::new().parse(regex).map_err(|e| e.to_string())?;
        text.push_str(&format!("{rule} ::= {}\n", gbnf_of(&hir, name)?));
    }
    Ok((text, recursive))
}

/// Rules of any JSON object, nested to any depth: rule `name` and its helpers `name-...`.
pub fn any_object_rules(name: &str) -> String {
    any_json_rules(name, "object")
}

/// Rules of any JSON `entry` (`value` or `object`, as [`JSON_OBJECT`] names them), nested to any
/// depth: rule `name` and its helpers `name-...`.
fn any_json_rules(name: &str, entry: &str) -> String {
    JSON_OBJECT
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            // Every rule renamed under `name` (`object` is the entry; root's whitespace dropped).
            let mut line = format!(" {l} ");
            for r in ["value", "object", "member", "array", "string", "number", "ws"] {
                line = line.replace(&format!(" {r} "), &format!(" {name}-{r} "));
            }
            line.trim().to_string()
        })
        .filter(|l| !l.starts_with("root "))
        .chain([format!("{name} ::= {name}-{entry}")])
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// A regular expression (its syntax tree) in GBNF; the reference marks as rules `name-ref-k`.
fn gbnf_of(hir: &regex_syntax::hir::Hir, name: &str) -> Result<String, String> {
    use regex_syntax::hir::{Class, HirKind};
    let mark = crate::schema::REF_MARK;
    Ok(match hir.kind() {
        HirKind::Empty => "\"\"".to_string(),
        HirKind::Literal(l) => {
            let text = std::str::from_utf8(&l.0).map_err(|_| "bytes that are not UTF-8".to_string())?;
            let mut parts: Vec<String> = Vec::new();
            let mut plain = String::new();
            for c in text.chars() {
                if (c as u32) >= mark && (c as u32) < mark + 0x10000 {
                    if !plain.is_empty() {
                        parts.push(quote(&std::mem::take(&mut plain)));
                    }
                    parts.push(format!("{name}-ref-{}", c as u32 - mark));
                } else {
                    plain.push(c);
                }
            }
            if !plain.is_empty() {
                parts.push(quote(&plain));
            }
            format!("( {} )", parts.join(" "))
        }
        HirKind::Class(Class::Unicode(c)) => {
            let ranges: String =
                c.iter().map(|r| format!("\\U{:08x}-\\U{:08x}", r.start() as u32, r.end() as u32)).collect();
            match ranges.is_empty() {
                true => "[^\\U00000000-\\U0010ffff]".to_string(),
                false => format!("[{ranges}]"),
            }
        }
        HirKind::Class(Class::Bytes(_)) => return Err("byte classes are not supported".into()),
        HirKind::Look(look) => return Err(format!("the assertion {look:?} is not supported")),
        HirKind::Repetition(r) => {
            let max = r.max.map_or(String::new(), |m| m.to_string());
            format!("( {} ){{{},{max}}}", gbnf_of(&r.sub, name)?, r.min)
        }
        HirKind::Capture(c) => gbnf_of(&c.sub, name)?,
        HirKind::Concat(parts) => {
            let each = parts.iter().map(|p| gbnf_of(p, name)).collect::<Result<Vec<_>, _>>()?;
            format!("( {} )", each.join(" "))
        }
        HirKind::Alternation(parts) => {
            let each = parts.iter().map(|p| gbnf_of(p, name)).collect::<Result<Vec<_>, _>>()?;
            format!("( {} )", each.join(" | "))
        }
    })
}

/// JSON's objects in GBNF (what serde_json reads, but for escapes of lone surrogates): an
/// example, and what the tests and benchmarks check the engine with.
pub const JSON_OBJECT: &str = r#"
# A JSON object, whitespace around it.
root   ::= ws object ws
value  ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" ws ( member ( ws "," ws member )* ws )? "}"
member ::= string ws ":" ws value
array  ::= "[" ws ( value ( ws "," ws value )* ws )? "]"
string ::= "\"" ( [^"\\\x00-\x1f] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws     ::= [ \t\n\r]*
"#;

/// The grammars read last, by their text (a server's requests repeat theirs).
static CACHE: Mutex<Vec<(String, Arc<Grammar>)>> = Mutex::new(Vec::new());

/// [`Grammar::parse`], kept: the last 16 grammars read are shared by their text.
pub fn cached(text: &str) -> Result<Arc<Grammar>, String> {
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, g)) = cache.iter().find(|(t, _)| t == text) {
        return Ok(g.clone());
    }
    let g = Arc::new(Grammar::parse(text)?);
    if cache.len() >= 16 {
        cache.remove(0);
    }
    cache.push((text.to_string(), g.clone()));
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use v3c_models::sampling::Constraint;

    const JSON: &str = JSON_OBJECT;

    fn fixture() -> Arc<Tokenizer> {
        crate::tokenizer::fixture::shared()
    }

    fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut state = seed;
        move |n| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % n
        }
    }

    /// Grammars without recursion take exactly what the same regular expression matches.
    #[test]
    fn regular_grammars_match_as_their_regular_expressions() {
        let mut next = rng(5);
        let alphabet: Vec<char> = "abcxyz019é-\n".chars().collect();
        for (gbnf, regex) in [
            (r#"root ::= [a-c]+ ("x" | "yz")? [0-9]{2,3}"#, "[a-c]+(x|yz)?[0-9]{2,3}"),
            (r#"root ::= "é"* [^a-c\n]{1,} | "-"? ab ab ::= "ab"{2}"#, "é*[^a-c\\n]+|-?abab"),
            ("root ::= . . ?\n# two or three\n . ?", "(?s).(.)?(.)?"),
            (r#"root ::= ( [ax] | [\x30-\x39] )+ "\n""#, "[ax0-9]+\\n"),
            (r#"root ::= "a" x{0,2} "b" x ::= "y" | "z""#, "a[yz]{0,2}b"),
            (r#"root ::= ("ab" | "a") "c"?"#, "(ab|a)c?"),
            // Repetitions of what may be empty: loops that read nothing, kept.
            (r#"root ::= ("a"?)* "b""#, "a*b"),
            (r#"root ::= ("a"? "b"?)+ "c""#, "[ab]*c"),
            ("root ::= x (\"-\" x)*\nx ::= (\"1\" | \"\")*", "1*(-1*)*"),
            ("root ::= y \"z\"\ny ::= \"x\"? y | \"\"", "x*z"),
        ] {
            let g = Grammar::parse(gbnf).unwrap_or_else(|e| panic!("{gbnf}: {e}"));
            let oracle = regex_automata::meta::Regex::new(&format!("^(?:{regex})$")).unwrap();
            let mut agreed = [0, 0];
            for _ in 0..3000 {
                let len = next(7);
                let text: String = (0..len).map(|_| alphabet[next(alphabet.len() as u64) as usize]).collect();
                let want = oracle.is_match(text.as_str());
                assert_eq!(g.matches(text.as_bytes()), want, "{gbnf} on {text:?}");
                agreed[want as usize] += 1;
            }
            assert!(agreed[1] > 0, "{gbnf}: no text matched");
        }
    }

    /// Recursion: balanced parentheses, every text of up to 12 of them.
    #[test]
    fn recursive_grammars_take_nested_sentences() {
        let g = Grammar::parse(r#"root ::= ( "(" root ")" )*"#).unwrap();
        for len in 0..=12 {
            for bits in 0u32..1 << len {
                let text: String = (0..len).map(|i| if bits >> i & 1 == 1 { '(' } else { ')' }).collect();
                let balanced = text
                    .chars()
                    .try_fold(0i32, |d, c| {
                        let d = if c == '(' { d + 1 } else { d - 1 };
                        (d >= 0).then_some(d)
                    })
                    .is_some_and(|d| d == 0);
                assert_eq!(g.matches(text.as_bytes()), balanced, "{text}");
            }
        }
        // Deep nesting stays within the stack's bound only as deep as it goes.
        let deep = format!("{}{}", "(".repeat(200), ")".repeat(200));
        assert!(g.matches(deep.as_bytes()));
    }

    /// The JSON grammar against serde_json: serde_json's own objects (compact and pretty), and
    /// each with one byte inserted, removed or replaced, are sentences exactly when serde_json
    /// reads an object.
    #[test]
    fn the_json_grammar_reads_what_serde_json_reads() {
        let g = Grammar::parse(JSON).unwrap();
        let mut next = rng(9);
        let docs = [
            serde_json::json!({}),
            serde_json::json!({"a": [1, -2.5e3, true, null, "x\"y\\z\n\u{1}é😀"], "b": {"c": {}}, "": []}),
            serde_json::json!({"n": 0, "m": [[], [{}], [0.5, 1e-7]], "s": "tab\there"}),
        ];
        let bytes = b"{}[]\",:0123456789.eE+-tfnul \n\\xa\x01\xc3\xa9\xe2\x82\xac";
        let mut seen = [0, 0];
        for doc in &docs {
            for text in [serde_json::to_string(doc).unwrap(), serde_json::to_string_pretty(doc).unwrap()] {
                assert!(g.matches(text.as_bytes()), "{text}");
                let text = text.into_bytes();
                for _ in 0..1500 {
                    let mut t = text.clone();
                    let at = next(t.len() as u64 + 1) as usize;
                    match next(3) {
                        0 => t.insert(at, bytes[next(bytes.len() as u64) as usize]),
                        1 if at < t.len() => _ = t.remove(at),
                        _ if at < t.len() => t[at] = bytes[next(bytes.len() as u64) as usize],
                        _ => continue,
                    }
                    let serde = match serde_json::from_slice::<serde_json::Value>(&t) {
                        Ok(v) => v.is_object(),
                        Err(e) => e.to_string().starts_with("number out of range"),
                    };
                    assert_eq!(g.matches(&t), serde, "{:?}", String::from_utf8_lossy(&t));
                    seen[serde as usize] += 1;
                }
            }
        }
        assert!(seen[0] > 100 && seen[1] > 100, "{seen:?}");
    }

    /// Recursive schemas become grammars: trees of nodes (through `$defs`) and linked lists
    /// (through `#`) take their instances, nested, with every kind of leaf the regular
    /// expressions write (bounded strings and integers, enums with escapes, formats, optional
    /// properties), and refuse them broken at any depth; schemas without recursion stay
    /// regular expressions.
    #[test]
    fn recursive_schemas_become_grammars() {
        let tree = serde_json::json!({
            "$ref": "#/$defs/node",
            "$defs": {"node": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 5},
                "n": {"type": "integer", "minimum": -3, "maximum": 120},
                "tag": {"enum": ["a", "b\"c"]},
                "when": {"type": "string", "format": "date"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3}},
                "required": ["name", "n", "kids"]}}
        });
        let g = Grammar::parse(&schema_grammar(&tree).unwrap().expect("recursive")).unwrap();
        let leaf = |name: &str, n: i64| serde_json::json!({"name": name, "n": n, "kids": []});
        let good = serde_json::json!({"name": "root", "n": 120, "tag": "b\"c", "kids": [
            leaf("x", -3),
            {"name": "mid", "n": 7, "when": "2026-12-01", "kids": [leaf("deep", 0), {"name": "", "n": 1, "tag": "a", "kids": [leaf("z", 2)]}]},
        ]});
        for text in [serde_json::to_string(&good).unwrap(), serde_json::to_string(&leaf("a", 1)).unwrap()] {
            assert!(g.matches(text.as_bytes()), "{text}");
        }
        let text = serde_json::to_string(&good).unwrap();
        for bad in [
            text.replace(r#""name":"deep","n":0"#, r#""name":"deep","n":121"#),
            text.replace(r#""name":"z","n":2,"kids":[]"#, r#""name":"z","n":2"#),
            text.replace(r#""name":"deep""#, r#""name":"deeper""#),
            text.replace("2026-12-01", "2026-13-01"),
            text.replace(r#""tag":"a""#, r#""tag":"c""#),
            text.replace(r#""kids":[]}]}]}"#, r#""kids":[],"x":1}]}]}"#),
        ] {
            assert_ne!(bad, text);
            assert!(!g.matches(bad.as_bytes()), "{bad}");
        }
        // Through the root: a list of names, each with the rest or null.
        let list = serde_json::json!({"type": "object", "properties": {"name": {"type": "string"},
            "next": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}}, "required": ["name", "next"]});
        let g = Grammar::parse(&schema_grammar(&list).unwrap().expect("recursive")).unwrap();
        let three = r#"{"name":"a","next":{"name":"b","next":{"name":"c","next":null}}}"#;
        assert!(g.matches(three.as_bytes()));
        assert!(!g.matches(three.replace("null", "{}").as_bytes()));
        // No recursion: the regular expression serves.
        let flat =
            serde_json::json!({"$ref": "#/$defs/a", "$defs": {"a": {"type": "array", "items": {"type": "null"}}}});
        assert_eq!(schema_grammar(&flat).unwrap(), None);
        // Objects whose properties are left open (`{"type": "object"}`, or additionalProperties
        // true without properties): any object there, nested to any depth.
        for open in
            [serde_json::json!({"type": "object"}), serde_json::json!({"type": "object", "additionalProperties": true})]
        {
            let schema = serde_json::json!({"type": "object", "properties": {"name": {"type": "string"},
                "options": open, "more": {"type": "array", "items": open}}, "required": ["name", "options"]});
            let g = Grammar::parse(&schema_grammar(&schema).unwrap().expect("a grammar")).unwrap();
            for (text, ok) in [
                (r#"{"name":"x","options":{}}"#, true),
                (r#"{"name": "x", "options": {"a": [1, {"b": null}], "c": "d"}}"#, true),
                (r#"{"name":"x","options":{"a":1},"more":[{},{"z":{"y":[]}}]}"#, true),
                (r#"{"name":"x","options":[1]}"#, false),
                (r#"{"name":"x","options":{"a":}}"#, false),
                (r#"{"name":"x"}"#, false),
            ] {
                assert_eq!(g.matches(text.as_bytes()), ok, "{text}");
            }
        }
        // Any value: `{}`, `true`, an array without items, other members beside the named ones.
        let schema = serde_json::json!({"type": "object", "properties": {"x": {}, "list": {"type": "array"},
            "t": true}, "required": ["x"], "additionalProperties": true});
        let g = Grammar::parse(&schema_grammar(&schema).unwrap().expect("a grammar")).unwrap();
        for (text, ok) in [
            (r#"{"x":1}"#, true),
            (r#"{"x":"s","list":[1,"a",{"b":[null]},[]],"t":false}"#, true),
            (r#"{"x":{"y":[{}]},"other":[1,2],"more":null}"#, true),
            (r#"{"x":null,"t":{"a":1},"x2":-1.5e3}"#, true),
            (r#"{"list":[]}"#, false),
            (r#"{"x":1,"x":2}"#, false),
            (r#"{"x":1,"other":1,"t":true}"#, false),
            (r#"{"x":1,"list":{}}"#, false),
            (r#"{"x":nul}"#, false),
        ] {
            assert_eq!(g.matches(text.as_bytes()), ok, "{text}");
        }
        for any in [serde_json::json!({}), serde_json::json!(true), serde_json::json!({"description": "any"})] {
            let g = Grammar::parse(&schema_grammar(&any).unwrap().expect("a grammar")).unwrap();
            for text in ["1", "\"a\"", "[1,{}]", "{\"a\":[true]}", "null", "-0.5"] {
                assert!(g.matches(text.as_bytes()), "{text} of {any}");
            }
            assert!(!g.matches(b"[1,]"));
        }
    }

    proptest::proptest! {
        /// Any text is read without panicking (a grammar or an error); grammars made of random
        /// pieces step through any bytes without panicking.
        #[test]
        fn any_text_is_read_without_panicking(
            text in "(root ::= |[a-z]{0,3} ?::= ?)[ \"\\[\\]()|*+?.{},0-9a-z^\\\\-]{0,24}( [a-z]{1,3} ::= [\"a-z|()*]{0,8})?",
            pieces in proptest::collection::vec(0usize..13, 0..12),
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..16),
        ) {
            const PIECES: [&str; 13] =
                ["\"a\"", "[a-c]", ".", "(", ")", "|", "*", "+", "?", "{1,2}", "x", "\"\\n\"", "[^\\x00-\\x7f]"];
            let _ = Grammar::parse(&text);
            let made: Vec<&str> = pieces.iter().map(|&k| PIECES[k]).collect();
            if let Ok(g) = Grammar::parse(&format!("root ::= {}\nx ::= \"b\" x | \"\"", made.join(" "))) {
                let mut s = g.start();
                for b in bytes {
                    match g.step(&s, b) {
                        Some(next) => s = next,
                        None => break,
                    }
                }
                let _ = g.accepts(&s);
            }
        }
    }

    #[test]
    fn bad_grammars_are_refused_saying_where() {
        let long = format!("root ::= \"{}\"{{1000}}", "a".repeat(300));
        for (text, error) in [
            ("", "an empty grammar"),
            ("root ::= x", "rule x is used but not defined"),
            ("start ::= \"a\"", "no rule named root"),
            ("root ::= root \"a\" | \"b\"", "rule root is left-recursive (root -> root)"),
            ("root ::= a\na ::= b? a \"x\"\nb ::= \"y\"", "rule a is left-recursive (a -> a)"),
            ("root ::= a\na ::= \"x\"? b\nb ::= a \"y\" | \"z\"", "rule b is left-recursive (b -> a -> b)"),
            ("root ::= root", "rule root matches no finite text: each of its alternatives needs a rule that never ends (root -> root)"),
            ("root ::= \"a\" root", "rule root matches no finite text"),
            ("root ::= x \"a\"\nx ::= \"b\" | y\ny ::= \"c\" y", "(y -> y)"),
            ("root ::= x | \"b\"\nx ::= \"a\" y\ny ::= x", "rule x matches no finite text: each of its alternatives needs a rule that never ends (x -> y -> x)"),
            ("root ::= \"a\"\nroot ::= \"b\"", "line 2, column 1: rule root is defined twice"),
            ("root ::= \"a", "line 1, column 12: a string that does not end"),
            ("root ::= [z-a]", "a range that runs backwards"),
            ("root ::= \"a\" []", "line 1, column 14: a class that matches no character"),
            ("root ::= [^\\x00-\\U0010FFFF]", "line 1, column 10: a class that matches no character"),
            ("root ::= [^\\x00-\\uD7FF\\uE000-\\U0010FFFF]", "a class that matches no character"),
            ("root ::= [^a\\x00-`b-\\U0010FFFF]", "a class that matches no character"),
            ("root = \"a\"", "line 1, column 6: expected ::= after root"),
            ("root ::= \"a\"{3,1}", "{3,1}: counts up to 1024, the least first"),
            ("root ::= \"\\q\"", "unknown escape \\q"),
            ("root ::= ( \"a\"", "expected )"),
            (long.as_str(), "repetitions spell more than 262144 elements"),
        ] {
            let e = Grammar::parse(text).unwrap_err();
            assert!(e.contains(error), "{text:?}: {e}");
        }
        // One character left is a class.
        for one in [
            "root ::= [^\\x00-\\U0010FFFE]",
            "root ::= [^\\x01-\\U0010FFFF]",
            "root ::= [^\\x00-\\uD7FE\\uE000-\\U0010FFFF]",
        ] {
            assert!(Grammar::parse(one).is_ok(), "{one}");
        }
    }

    /// Masks: at states along a text, the tokens allowed are those whose bytes the grammar takes
    /// from there, fed one by one; and sampling under the JSON grammar from random logits writes
    /// objects serde_json reads.
    #[test]
    fn masks_and_sampling_follow_the_grammar() {
        let t = fixture();
        let g = Arc::new(Grammar::parse(JSON).unwrap());
        let trie = t.trie();
        let text = br#"{"key": [12, "str\u00e9 \"x", {"a": null}], "b": -0.5e+3}"#;
        let mut s = g.start();
        for (k, &b) in text.iter().enumerate() {
            if k % 3 == 0 {
                let ok = g.allowed(&trie, &s);
                for id in 0..t.vocab_size() as u32 {
                    let bytes = t.token_bytes_of(id);
                    let fed = !t.is_special(id)
                        && !bytes.is_empty()
                        && bytes.iter().try_fold(s.clone(), |s, &b| g.step(&s, b)).is_some();
                    assert_eq!(
                        crate::grammar::has(&ok, id),
                        fed,
                        "at {k}: token {id} {:?}",
                        String::from_utf8_lossy(&bytes)
                    );
                }
            }
            s = g.step(&s, b).unwrap();
        }
        assert!(g.accepts(&s));
        let eos = t.token_id("<｜end▁of▁sentence｜>").unwrap();
        let mut next = rng(3);
        let mut ended = 0;
        for _ in 0..30 {
            let mut c = GrammarConstraint::new(g.clone(), &t, eos);
            let mut out = Vec::new();
            for _ in 0..80 {
                let mut logits: Vec<f32> = (0..t.vocab_size() as u32)
                    .map(|i| {
                        let b = t.token_bytes_of(i);
                        let lean = if b.contains(&b'}') || b.contains(&b']') || i == eos { 3.0 } else { 0.0 };
                        lean + next(1000) as f32 / 250.0
                    })
                    .collect();
                c.mask(&mut logits);
                let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32;
                assert!(logits[best as usize].is_finite(), "nothing after {:?}", String::from_utf8_lossy(&out));
                if best == eos {
                    ended += 1;
                    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
                    assert!(v.is_object(), "{v}");
                    break;
                }
                out.extend(t.token_bytes_of(best));
                c.advance(best);
            }
        }
        assert!(ended >= 10, "{ended} of 30 ended");
    }
}
