//! Perplexity of a model over a token stream, through an artifact's prefill: how well a compiled
//! model (fp8 kernels, a GPU's) predicts text, beside the checkpoint's other backends.
//!
//! The stream is cut into windows of `window` tokens starting every `stride` tokens, the last
//! ending at the stream's end (Hugging Face's sliding-window recipe): each window is prefilled
//! from position 0 on its own, and each token is scored once — in the first window that reaches
//! it, by the logits of the token before it in that window (a window's first token has none, so
//! with `stride == window` the first token of every window goes unscored).

use crate::session::{ArtifactSession, Program};

/// What [`perplexity`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// Tokens scored.
    pub tokens: usize,
    /// Their negative log-likelihood, summed (nats).
    pub nll: f64,
    pub windows: usize,
    /// Wall time of the prefills and the scoring.
    pub seconds: f64,
}

impl Perplexity {
    /// Mean negative log-likelihood a token (nats).
    pub fn mean_nll(&self) -> f64 {
        self.nll / self.tokens.max(1) as f64
    }

    /// exp(mean negative log-likelihood).
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// The windows over a stream of `len` tokens: (first token, end, first token scored).
pub fn windows(len: usize, window: usize, stride: usize) -> Result<Vec<(usize, usize, usize)>, String> {
    if window < 2 {
        return Err(format!("--window {window}: at least 2 tokens (one to predict the next)"));
    }
    if stride == 0 || stride > window {
        return Err(format!("--stride {stride}: 1..={window} (the window), so that every token is scored"));
    }
    if len < 2 {
        return Err(format!("{len} tokens: at least 2 to score one"));
    }
    let (mut out, mut begin, mut scored_to) = (Vec::new(), 0, 0);
    loop {
        let end = (begin + window).min(len);
        out.push((begin, end, scored_to.max(begin + 1)));
        scored_to = end;
        if end == len {
            return Ok(out);
        }
        begin += stride;
    }
}

/// Negative log-likelihood of `token` under softmax(`logits`), in f64
/// ([`log_sum_exp`](v3c_models::sampling::log_sum_exp)).
fn nll(logits: &[f32], token: u32) -> f64 {
    v3c_models::sampling::RowScore::of(logits, token).nll()
}

/// Perplexity of `program`'s model over `tokens` ([`windows`] of `window` every `stride`),
/// `progress(windows done, windows)` after each window.
pub fn perplexity(
    program: &dyn Program,
    tokens: &[u32],
    window: usize,
    stride: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity, String> {
    let start = std::time::Instant::now();
    let plan = windows(tokens.len(), window, stride)?;
    let mut result = Perplexity { tokens: 0, nll: 0.0, windows: plan.len(), seconds: 0.0 };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    for (w, &(begin, end, scored)) in plan.iter().enumerate() {
        let mut session = ArtifactSession::new(program, end - begin)?;
        let targets: Vec<usize> = (scored..end).collect();
        // Token k is predicted by the logits of row k - 1 of the window: scored where the program
        // runs where it can (the same bits), else the rows read back and scored on all cores; the
        // tokens' NLLs added in order either way.
        let nlls: Vec<f64> =
            match session.prefill_scores(&tokens[begin..end]).map_err(|e| format!("window {w}: {e}"))? {
                Some(scores) => targets.iter().map(|&k| scores[k - begin - 1].nll()).collect(),
                None => {
                    let (rows, vocab) =
                        session.prefill_rows(&tokens[begin..end]).map_err(|e| format!("window {w}: {e}"))?;
                    let per_thread = targets.len().div_ceil(threads).max(1);
                    std::thread::scope(|scope| {
                        let rows = &rows;
                        let handles: Vec<_> = targets
                            .chunks(per_thread)
                            .map(|ks| {
                                scope.spawn(move || {
                                    let row = |k: usize| &rows[(k - begin - 1) * vocab..(k - begin) * vocab];
                                    ks.iter().map(|&k| nll(row(k), tokens[k])).collect::<Vec<f64>>()
                                })
                            })
                            .collect();
                        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| vec![f64::NAN])).collect()
                    })
                }
            };
        result.nll += nlls.iter().sum::<f64>();
        result.tokens += targets.len();
        progress(w + 1, plan.len());
    }
    result.seconds = start.elapsed().as_secs_f64();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Windows of at most `window` tokens, `stride` apart, the last ending at the stream's end;
        /// every token but the first scored exactly once, by a row before it in its window.
        #[test]
        fn every_token_after_the_first_is_scored_once(len in 2usize..300, window in 2usize..64, stride in 1usize..64) {
            proptest::prop_assume!(stride <= window);
            let plan = windows(len, window, stride).unwrap();
            let mut scored = vec![0; len];
            for (i, &(begin, end, from)) in plan.iter().enumerate() {
                proptest::prop_assert!(end - begin <= window && begin < from && from <= end);
                proptest::prop_assert_eq!(begin, i * stride);
                for n in &mut scored[from..end] {
                    *n += 1;
                }
            }
            proptest::prop_assert_eq!(plan.last().unwrap().1, len);
            let firsts: Vec<usize> = plan.iter().map(|w| w.0).collect();
            for (k, &n) in scored.iter().enumerate() {
                // Unscored: the stream's first token, and with stride == window each window's first.
                let expected = usize::from(k != 0 && !(stride == window && firsts.contains(&k)));
                proptest::prop_assert_eq!(n, expected, "token {}", k);
            }
        }
    }

    #[test]
    fn bad_windows_are_refused_by_flag() {
        assert!(windows(10, 1, 1).unwrap_err().starts_with("--window 1"));
        assert!(windows(10, 4, 5).unwrap_err().starts_with("--stride 5: 1..=4"));
        assert!(windows(10, 4, 0).unwrap_err().starts_with("--stride 0"));
        assert!(windows(1, 4, 4).unwrap_err().starts_with("1 tokens"));
        assert_eq!(windows(5, 8, 8).unwrap(), [(0, 5, 1)]);
        assert_eq!(windows(10, 4, 3).unwrap(), [(0, 4, 1), (3, 7, 4), (6, 10, 7)]);
    }

    #[test]
    fn nll_is_minus_the_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        for t in 0..3 {
            let want = -(f64::from(logits[t]).exp() / z).ln();
            assert!((nll(&logits, t as u32) - want).abs() < 1e-12);
        }
        assert!(nll(&logits, 7).is_nan());
    }
}
