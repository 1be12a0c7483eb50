//! Host-side conversions of cache rows, as sessions make them on every upload and read-back of a
//! GPU artifact's fp8 caches (`v3c compile --kv-cache fp8`): `host_fp8_rows` packs 4096 rows of
//! DeepSeek-V3's 576 columns into fp8 cache rows (`Fp8LatentRow::pack`: |max| per 128 columns,
//! power-of-two scales, e4m3 encoding, the bf16 rope key) and unpacks them, throughput in f32
//! values.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use v3c_runtime::plan::Fp8LatentRow;

const ROWS: usize = 4096;
const COLS: usize = 576;

fn host_fp8_rows(c: &mut Criterion) {
    let row = Fp8LatentRow::of(COLS).expect("DeepSeek-V3's rows");
    let values: Vec<f32> = (0..ROWS * COLS).map(|i| ((i * 7919) % 2000) as f32 / 500.0 - 2.0).collect();
    let mut packed = vec![0u8; ROWS * row.bytes()];
    let mut back = vec![0f32; ROWS * COLS];
    let mut g = c.benchmark_group("host_fp8_rows");
    g.throughput(Throughput::Elements((ROWS * COLS) as u64));
    g.bench_function("pack_4096x576", |b| {
        b.iter(|| {
            for (r, o) in values.chunks_exact(COLS).zip(packed.chunks_exact_mut(row.bytes())) {
                row.pack(r, o);
            }
        })
    });
    g.bench_function("unpack_4096x576", |b| {
        b.iter(|| {
            for (p, r) in packed.chunks_exact(row.bytes()).zip(back.chunks_exact_mut(COLS)) {
                row.unpack(p, r);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, host_fp8_rows);
criterion_main!(benches);
