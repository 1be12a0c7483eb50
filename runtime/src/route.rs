//! A reply's tokens routed as they come, for the servers' streams and `v3r chat`: with a
//! reasoning parser ([`crate::reasoning`]) into reasoning and answer; the answer's text as it
//! settles (held back while it may be a stop string); and from the token that opens tool calls,
//! the calls as they are written ([`crate::tools::CallStream`]).

use std::sync::Arc;

use crate::openai::{called, Called};
use crate::reasoning::Reasoning;
use crate::session::{TextSoFar, TextStops};
use crate::tokenizer::Tokenizer;

/// What a reply's token comes to, told by a [`Router`]: its log-probability and alternatives
/// (where they were asked for) with the token that carries text.
pub enum Routed {
    /// Reasoning text (empty: the reasoning opened; `token` None: the opening marker).
    Think { text: String, token: Option<u32>, scored: Scored },
    /// The reasoning's last text: it is over (at its closing marker).
    ThinkEnd(String),
    /// Answer text (`token` None: what the answer's text held back, said when the calls open).
    Say { text: String, token: Option<u32>, scored: Scored },
    /// A tool call as it is written.
    Call(crate::tools::CallEvent),
}

/// A token's log-probability and alternatives, where they were asked for.
pub type Scored = Option<(f32, Vec<(u32, f32)>)>;

/// A reply's tokens routed as they come: with a chat's reasoning parser, into reasoning and
/// answer; the answer's text as it settles (held back while it may be a stop string) — until
/// the token that opens tool calls, from which the calls are followed as they are written
/// ([`crate::tools::CallStream`]); text after that token that makes no call is answer after
/// all ([`Router::end`]).
pub struct Router {
    tokenizer: Option<Arc<Tokenizer>>,
    stops: Option<TextStops>,
    reasoning: Option<Reasoning>,
    phase: Option<crate::reasoning::Phase>,
    thought: Option<TextSoFar>,
    text: Option<TextSoFar>,
    /// The token that opens calls, and how they are written.
    opener: Option<(u32, crate::tools::ToolFormat)>,
    calls: Option<crate::tools::CallStream>,
    /// The text after the opener, and whether a call began.
    held: Option<String>,
    started: bool,
}

/// How a routed reply ended: its reasoning's tokens (None: it did not reason), its calls, and
/// the last text of its reasoning and of its answer (none where it called).
pub struct RouteEnd {
    pub reasoning: Option<Vec<u32>>,
    /// Its answer's tokens.
    pub answer: Vec<u32>,
    pub called: Option<Called>,
    pub thought: String,
    pub rest: String,
}

impl Router {
    /// A reply's router: its text through `tokenizer` (none: no text) held back at `stops`, read
    /// for reasoning with `reasoning` and for calls of `tools`.
    pub fn new(
        tokenizer: Option<&Arc<Tokenizer>>,
        stops: Option<&TextStops>,
        reasoning: Option<Reasoning>,
        tools: Option<&crate::tools::Tools>,
    ) -> Router {
        Router {
            tokenizer: tokenizer.cloned(),
            stops: stops.cloned(),
            reasoning,
            phase: reasoning.map(|r| r.first()),
            thought: None,
            text: tokenizer.map(|t| TextSoFar::new(t, stops)),
            opener: tools.filter(|x| x.calling() && tokenizer.is_some()).map(|x| (x.trigger, x.format)),
            calls: None,
            held: None,
            started: false,
        }
    }

    /// Token `t` (`scored`: its log-probabilities): what it comes to.
    pub fn token(&mut self, t: u32, scored: Scored) -> Vec<Routed> {
        use crate::reasoning::{Part, Phase};
        let part = match (self.reasoning, self.phase) {
            (Some(r), Some(now)) => {
                let (after, part) = r.step(now, t);
                self.phase = Some(after);
                part
            }
            _ => Some(Part::Content),
        };
        let tokenizer = self.tokenizer.clone();
        let push = |x: &mut Option<TextSoFar>| x.as_mut().map_or(String::new(), |x| x.push(t));
        match part {
            Some(Part::Reasoning) => {
                if let (None, Some(tok)) = (&self.thought, &tokenizer) {
                    self.thought = Some(TextSoFar::new(tok, None));
                }
                vec![Routed::Think { text: push(&mut self.thought), token: Some(t), scored }]
            }
            // A marker: opening the reasoning, or closing it.
            None if self.phase == Some(Phase::Reasoning) => {
                vec![Routed::Think { text: String::new(), token: None, scored: None }]
            }
            None => vec![Routed::ThinkEnd(self.thought.take().map_or(String::new(), TextSoFar::finish))],
            Some(Part::Content) => {
                let mut out = Vec::new();
                if let (None, Some((trigger, format)), Some(tok)) = (&self.calls, self.opener, &tokenizer) {
                    if trigger == t {
                        // The answer's text is over: what it held back, said.
                        let fresh = TextSoFar::new(tok, self.stops.as_ref());
                        let before = self.text.replace(fresh).map_or(String::new(), TextSoFar::finish);
                        out.push(Routed::Say { text: before, token: None, scored: None });
                        self.calls = Some(crate::tools::CallStream::new(format));
                        self.held = Some(String::new());
                    }
                }
                let piece = push(&mut self.text);
                match (&mut self.calls, &tokenizer) {
                    (Some(c), Some(tok)) => {
                        self.held.get_or_insert_with(String::new).push_str(&piece);
                        for e in c.push(tok, t) {
                            self.started = true;
                            out.push(Routed::Call(e));
                        }
                    }
                    _ => out.push(Routed::Say { text: piece, token: Some(t), scored }),
                }
                out
            }
        }
    }

    /// The reply ended with `tokens` (request `number`'s, which may call `tools`): how.
    pub fn end(mut self, number: usize, tools: Option<&crate::tools::Tools>, tokens: &[u32]) -> RouteEnd {
        let (reasoning, answer) = match self.reasoning {
            Some(r) => r.split(tokens),
            None => (None, tokens.to_vec()),
        };
        let called = match (&self.held, &self.tokenizer) {
            (Some(_), Some(t)) => called(tools, t, number, &answer),
            _ => None,
        };
        let mut rest = self.text.take().map_or(String::new(), TextSoFar::finish);
        if called.is_some() || self.started {
            rest.clear();
        } else if let Some(h) = self.held.take() {
            // No call made: the text is the answer's after all.
            rest = h + &rest;
        }
        let thought = self.thought.take().map_or(String::new(), TextSoFar::finish);
        RouteEnd { reasoning, answer, called, thought, rest }
    }
}
