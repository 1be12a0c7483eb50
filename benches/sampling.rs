//! Picking the next token on the host, as sessions do for every sequence of every decode step
//! that does not decode greedily on the device: `Sampler::sample` over one row of DeepSeek-V3's
//! 129280 logits — greedy, with a temperature over the whole vocabulary (top-p 1, the default)
//! and within a 0.9 nucleus; within the top 50, and a 0.9 nucleus cut again by min-p 0.05; with
//! OpenAI's presence and frequency penalties and a repetition penalty after a 2000-token prompt
//! (the row copied and changed before it is drawn from; 500 tokens generated, each sample from a
//! copy of that sampler). Logits: a peaked, made-up row (a few hundred plausible tokens over
//! a long flat tail), as a trained model's are. `sample_batch64`: a decode step's 64 sequences
//! sampled one by one, and together (`Next::pick_each`: spread over the cores). `logprobs_129280`:
//! what a request for log-probabilities adds to each of its tokens — the chosen token's, the top 5
//! and 20 alternatives' (OpenAI's `logprobs` and `top_logprobs`), and both at once as serving takes
//! them. `speculative_129280`: speculative decoding's verdict on a draft token the main model keeps.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use v3c_models::reference::{Sampler, Shaping};
use v3c_runtime::session::{log_probability, scores, top_log_probabilities};
use v3c_runtime::speculative::verify;

const VOCAB: usize = 129_280;

fn logits() -> Vec<f32> {
    (0..VOCAB)
        .map(|i| {
            let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
            let noise = (h % 1000) as f32 / 1000.0;
            if h.is_multiple_of(500) {
                8.0 + 4.0 * noise
            } else {
                2.0 * noise - 4.0
            }
        })
        .collect()
}

fn sampling(c: &mut Criterion) {
    let row = logits();
    let mut g = c.benchmark_group("sample_129280");
    for (name, temperature, top_p) in [("greedy", 0.0, 1.0), ("t0.7_p1", 0.7, 1.0), ("t0.7_p0.9", 0.7, 0.9)] {
        let mut sampler = Sampler::new(temperature, top_p, 1);
        g.bench_function(name, |b| b.iter(|| sampler.sample(std::hint::black_box(&row))));
    }
    let top_k = Shaping { top_k: 50, ..Shaping::default() };
    let min_p = Shaping { min_p: 0.05, ..Shaping::default() };
    let penalties =
        Shaping { repetition_penalty: 1.1, presence_penalty: 0.5, frequency_penalty: 0.5, ..Shaping::default() };
    for (name, top_p, shaping) in
        [("t0.7_k50", 1.0, top_k), ("t0.7_p0.9_minp0.05", 0.9, min_p), ("t0.7_penalties", 1.0, penalties)]
    {
        let mut sampler = Sampler::new(0.7, top_p, 1).shaped(shaping);
        sampler.start(&(0..2000).map(|i| (i * 61) % VOCAB as u32).collect::<Vec<_>>());
        // 500 tokens generated so far. Each sample starts from a copy: the penalties count every
        // token picked, and a sampler drawing on over the run would count ever more.
        for i in 0..500 {
            sampler.note((i * 257) % VOCAB as u32);
        }
        g.bench_function(name, |b| {
            b.iter_batched_ref(|| sampler.clone(), |s| s.sample(std::hint::black_box(&row)), BatchSize::SmallInput)
        });
    }
    g.finish();
    let mut g = c.benchmark_group("logprobs_129280");
    g.bench_function("token", |b| b.iter(|| log_probability(std::hint::black_box(&row), 7)));
    for k in [5, 20] {
        g.bench_function(format!("top{k}"), |b| b.iter(|| top_log_probabilities(std::hint::black_box(&row), k)));
    }
    g.bench_function("token_and_top5", |b| b.iter(|| scores(std::hint::black_box(&row), 7, 5)));
    g.finish();
    // Speculative decoding's verdict on a draft token (MTP), which the main model's row keeps: p the
    // main model's distribution at T 0.7, q the draft's (the same row, shifted a little).
    let mut g = c.benchmark_group("speculative_129280");
    let sampler = Sampler::new(0.7, 1.0, 3);
    let p = sampler.distribution(&row);
    let q = sampler.distribution(&row.iter().map(|l| l * 0.98).collect::<Vec<_>>());
    let kept = (0..VOCAB as u32).max_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize])).unwrap_or(0);
    g.bench_function("verify_kept", |b| {
        let mut s = sampler.clone();
        b.iter(|| verify(std::hint::black_box(&p), &q, kept, &mut s))
    });
    g.finish();
    let rows: Vec<Vec<f32>> = (0..64).map(|r| row.iter().map(|l| l + (r % 5) as f32 * 0.01).collect()).collect();
    let logits = v3c_runtime::session::Next::Logits(v3c_runtime::session::LogitRows::of(rows));
    let mut samplers: Vec<Sampler> = (0..64).map(|i| Sampler::new(0.7, 0.9, i)).collect();
    let mut g = c.benchmark_group("sample_batch64");
    g.sample_size(20);
    g.bench_function("one_by_one", |b| {
        b.iter(|| samplers.iter_mut().enumerate().map(|(i, s)| logits.pick(i, s)).collect::<Vec<_>>())
    });
    g.bench_function("together", |b| {
        b.iter(|| {
            let mut wanted: Vec<(usize, &mut Sampler)> = samplers.iter_mut().enumerate().collect();
            logits.pick_each(&mut wanted)
        })
    });
    g.finish();
}

criterion_group!(benches, sampling);
criterion_main!(benches);
