//! DeepSeek-R1's reasoning, told apart from its answer (vLLM's `--reasoning-parser
//! deepseek_r1`): a chat completion's tokens between `<think>` and `</think>` are its
//! `reasoning_content`, those after its `content`. R1's chat template opens the `<think>` itself
//! at the end of the prompt; then the completion starts inside its reasoning.
//!
//! [`Reasoning::step`] follows a completion a token at a time (streams route each token's text by
//! it); [`Reasoning::split`] takes a whole one the same way, so a streamed reply and a whole one
//! part alike. A completion that starts outside a `<think>` and does not open one is all
//! content; one whose reasoning never closes is all reasoning.

use crate::tokenizer::Tokenizer;

pub const THINK: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// A chat completion's markers, and whether its prompt left a `<think>` open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reasoning {
    start: u32,
    end: u32,
    open: bool,
}

/// Where a completion is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before its first token: a `<think>` now opens reasoning, anything else is the answer.
    Undecided,
    Reasoning,
    Content,
}

/// Which part a token's text belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Reasoning,
    Content,
}

impl Reasoning {
    /// The markers of `tokenizer`, for a completion after `prompt`.
    pub fn new(tokenizer: &Tokenizer, prompt: &[u32]) -> Result<Reasoning, String> {
        let id = |t: &str| {
            tokenizer.token_id(t).ok_or_else(|| format!("reasoning (deepseek-r1): the tokenizer has no {t} token"))
        };
        let (start, end) = (id(THINK)?, id(THINK_END)?);
        let open = prompt.iter().rposition(|&t| t == start).is_some_and(|s| !prompt[s..].contains(&end));
        Ok(Reasoning { start, end, open })
    }

    /// Where a completion starts.
    pub fn first(&self) -> Phase {
        if self.open {
            Phase::Reasoning
        } else {
            Phase::Undecided
        }
    }

    /// Token `t` in `phase`: the phase after it, and the part its text belongs to (None: a
    /// marker, no text).
    pub fn step(&self, phase: Phase, t: u32) -> (Phase, Option<Part>) {
        match phase {
            Phase::Undecided if t == self.start => (Phase::Reasoning, None),
            Phase::Reasoning if t == self.end => (Phase::Content, None),
            Phase::Reasoning => (Phase::Reasoning, Some(Part::Reasoning)),
            Phase::Undecided | Phase::Content => (Phase::Content, Some(Part::Content)),
        }
    }

    /// A whole completion's reasoning tokens (None: it did not reason) and answer tokens.
    pub fn split(&self, tokens: &[u32]) -> (Option<Vec<u32>>, Vec<u32>) {
        let (mut phase, mut reasoned) = (self.first(), self.open);
        let (mut reasoning, mut content) = (Vec::new(), Vec::new());
        for &t in tokens {
            let (next, part) = self.step(phase, t);
            reasoned |= next == Phase::Reasoning;
            match part {
                Some(Part::Reasoning) => reasoning.push(t),
                Some(Part::Content) => content.push(t),
                None => {}
            }
            phase = next;
        }
        (reasoned.then_some(reasoning), content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::sync::Arc<Tokenizer> {
        crate::tokenizer::fixture::shared()
    }

    /// Completions part as R1's are read: after an open `<think>` in the prompt, or one the
    /// completion opens, the reasoning runs to `</think>`; without either all is answer; an
    /// unclosed reasoning is all reasoning; a second `</think>` is answer text. Token by token,
    /// the same parts.
    #[test]
    fn completions_part_into_reasoning_and_answer() {
        let t = fixture();
        let (think, end) = (t.token_id(THINK).unwrap(), t.token_id(THINK_END).unwrap());
        let user = t.encode("question", false);
        let (a, b, c) = (t.encode("mull", false), t.encode("answer", false), t.encode(" more", false));
        let cat = |parts: &[&[u32]]| parts.concat();
        let opened = Reasoning::new(&t, &cat(&[&user, &[think]])).unwrap();
        let closed = Reasoning::new(&t, &cat(&[&user, &[think], &a, &[end]])).unwrap();
        let plain = Reasoning::new(&t, &user).unwrap();
        for (r, tokens, reasoning, content) in [
            (opened, cat(&[&a, &[end], &b]), Some(a.clone()), b.clone()),
            (opened, a.clone(), Some(a.clone()), vec![]),
            (opened, cat(&[&a, &[end], &b, &[end], &c]), Some(a.clone()), cat(&[&b, &[end], &c])),
            (plain, cat(&[&[think], &a, &[end], &b]), Some(a.clone()), b.clone()),
            (plain, b.clone(), None, b.clone()),
            (plain, cat(&[&b, &[think], &a]), None, cat(&[&b, &[think], &a])),
            (closed, cat(&[&[think], &c, &[end], &b]), Some(c.clone()), b.clone()),
            (opened, vec![], Some(vec![]), vec![]),
        ] {
            assert_eq!(r.split(&tokens), (reasoning, content.clone()), "{tokens:?}");
            let (mut phase, mut streamed) = (r.first(), vec![]);
            for &tok in &tokens {
                let (next, part) = r.step(phase, tok);
                if part == Some(Part::Content) {
                    streamed.push(tok);
                }
                phase = next;
            }
            assert_eq!(streamed, content);
        }
        let mut json = crate::tokenizer::fixture::json();
        json["added_tokens"].as_array_mut().unwrap().retain(|a| a["content"] != THINK_END);
        json["model"]["vocab"].as_object_mut().unwrap().remove(THINK_END);
        let bare = Tokenizer::from_json(&json.to_string(), None).unwrap();
        assert_eq!(
            Reasoning::new(&bare, &user).unwrap_err(),
            "reasoning (deepseek-r1): the tokenizer has no </think> token"
        );
    }
}
