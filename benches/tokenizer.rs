//! Text to token ids and back with the tokenizer `v3r run --prompt` and `serve` use
//! (`v3c_runtime::tokenizer`): the fixture tokenizer.json (DeepSeek-V3's pre-tokenizer chain, a
//! 980-token BPE that `tests/fixtures/gen_tokenizer.py` trained) over this repository's README and
//! `docs/details.md` (prose, code, tables, Unicode): encoding with the template's BOS, and decoding
//! the ids back.
//! Loading the file is timed too.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use v3c_runtime::tokenizer::Tokenizer;

fn tokenizer(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let file = root.join("tests/fixtures/tokenizer/tokenizer.json");
    let read = |path: &str| std::fs::read_to_string(root.join(path)).expect("the repository's docs");
    let text = read("README.md") + "\n" + &read("docs/details.md");
    let t = Tokenizer::from_file(&file).expect("the fixture tokenizer");
    let ids = t.encode(&text, true);
    let mut g = c.benchmark_group("tokenizer_readme");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("encode", |b| b.iter(|| t.encode(std::hint::black_box(&text), true)));
    g.bench_function("decode", |b| b.iter(|| t.decode(std::hint::black_box(&ids), false)));
    g.finish();
    c.bench_function("tokenizer_load_fixture", |b| b.iter(|| Tokenizer::from_file(&file).expect("loads")));
}

criterion_group!(benches, tokenizer);
criterion_main!(benches);
