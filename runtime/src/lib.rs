//! `v3c-runtime`: the thin layer that loads a v3c artifact and launches its kernels on a CUDA device.
//!
//! It never links MLIR or LLVM (the compiler binary is ~170 MB; this one must stay a few MB so it
//! travels next to an artifact to a GPU box). CUDA is reached through cudarc with dynamic loading:
//! the crate builds and runs on machines with no CUDA at all, and every entry point that needs a GPU
//! returns a clean [`DeviceError`] instead of panicking.
//!
//! It holds device discovery ([`device`]), the artifact reader/validator ([`artifact`]), the
//! executor of `cpu` artifacts ([`cpu`]: kernels `dlopen`ed, the plan's launches over one arena,
//! on [`host`] buffers), kernel calling conventions ([`abi`]), a GPU artifact's launches expanded
//! from its plan and lowering ([`gpu`]) and run on the device ([`cuda`]), a training step's optimizer
//! there ([`optimizer`]), generation on either
//! ([`session`], with MTP drafts: [`speculative`]; structured output: [`grammar`]; tool calls: [`tools`]), and the tuning database with its GPU
//! measurement ([`tuning`], [`measure`]).

pub mod abi;
pub mod artifact;
pub mod cli;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod gbnf;
pub mod gpu;
pub mod grammar;
pub mod host;
pub mod http;
pub mod interrupt;
pub mod lowering;
pub mod measure;
pub mod messages;
pub mod openai;
pub mod optimizer;
pub mod pages;
pub mod perplexity;
pub mod plan;
pub mod prepare;
pub mod reasoning;
pub mod responses;
pub mod route;
pub mod schema;
pub mod session;
pub mod signature;
pub mod speculative;
pub mod tokenizer;
pub mod tools;
pub mod training;
pub mod tuning;

pub use device::{probe_devices, DeviceError, DeviceInfo, DriverInfo};
