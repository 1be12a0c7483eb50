//! Benchmarks for v3c. CPU benchmarks are criterion benches in this folder (`cargo bench -p
//! v3c-benches`); GPU timing lives in `benches/device/` (one prepared script, see
//! `shared/design/GPU-CHECKS.md`), never in timed tests.
