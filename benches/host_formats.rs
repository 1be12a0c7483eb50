//! Host-side conversions of cache rows, as sessions make them on every upload and read-back of a
//! GPU artifact's fp8 caches (`v3c compile --kv-cache fp8`): `host_fp8_rows` packs 4096 rows of
//! DeepSeek-V3's 576 columns into fp8 cache rows (`Fp8LatentRow::pack`: |max| per 128 columns,
//! power-of-two scales, e4m3 encoding, the bf16 rope key) and unpacks them, throughput in f32
//! values. `logits_readback`: a decode step's logits of 64 sequences over DeepSeek-V3's 129280
//! tokens (33 MB of f32) from the read-back bytes (a host copy stands in for the device's) to the
//! rows the samplers take — converted from a byte buffer and copied row by row (as before), and
//! read straight into the values and kept in the one buffer (`gpu::read_host_buffer`,
//! `session::LogitRows`).

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

fn logits_readback(c: &mut Criterion) {
    use v3c_runtime::{gpu, host::HostData, session::LogitRows};
    const BATCH: usize = 64;
    const VOCAB: usize = 129_280;
    let device: Vec<u8> = (0..BATCH * VOCAB).flat_map(|i| ((i % 977) as f32 / 97.0).to_le_bytes()).collect();
    let shape = vec![BATCH, VOCAB];
    let mut g = c.benchmark_group("logits_readback_64x129280");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(device.len() as u64));
    g.bench_function("converted_rows_copied", |b| {
        b.iter(|| {
            let mut host = vec![0u8; device.len()];
            host.copy_from_slice(&device);
            let buffer = gpu::host_buffer(&host, shape.clone(), "f32").expect("f32");
            let HostData::F32(v) = &buffer.data else { unreachable!() };
            v.chunks(VOCAB).map(<[f32]>::to_vec).collect::<Vec<_>>()
        })
    });
    g.bench_function("read_in_place", |b| {
        b.iter(|| {
            let read = |host: &mut [u8]| {
                host.copy_from_slice(&device);
                Ok(())
            };
            let buffer = gpu::read_host_buffer(shape.clone(), "f32", device.len(), read).expect("f32");
            let HostData::F32(v) = buffer.data else { unreachable!() };
            LogitRows::new(v, VOCAB)
        })
    });
    g.finish();
}

criterion_group!(benches, host_fp8_rows, logits_readback);
criterion_main!(benches);
