//! `v3c-models`: the model DSL (a typed graph of kernel-level ops), DeepSeek-V3 written in it,
//! Hugging Face configs and checkpoints, and the reference interpreter every backend is checked
//! against. Pure Rust: no MLIR.
//!
//! - [`graph`]: values, ops, the shape-checking [`graph::Builder`];
//! - [`config`]: `config.json` parsing and validation, presets;
//! - [`deepseek_v3`]: the model's entry points (`prefill`, `decode`) built from a config;
//! - [`rope`]: RoPE/YaRN frequencies and the softmax scale, as transformers computes them;
//! - [`dtype`]: bf16 / fp8 e4m3 conversions;
//! - [`checkpoint`]: safetensors checkpoints (single or sharded, memory-mapped);
//! - [`interp`]: the reference interpreter; [`tensor`]: its host tensors;
//! - [`sampling`]: picking tokens from logits (temperature, top-k/p, min-p, penalties, bias).

pub mod autodiff;
pub mod checkpoint;
pub mod config;
pub mod deepseek_v3;
pub mod dtype;
pub mod graph;
pub mod init;
pub mod interp;
pub mod reference;
pub mod rope;
pub mod sampling;
pub mod tensor;
pub mod train;

pub use config::ModelConfig;
pub use deepseek_v3::{build, build_block, Block, BuildOptions, Entry, Precision};
pub use graph::Graph;
