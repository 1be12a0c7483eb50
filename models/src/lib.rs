//! `v3c-models`: the model DSL (typed graph builder), DeepSeek-V3 in it, configs, checkpoint I/O and
//! the reference interpreter. Pure Rust: no MLIR.
