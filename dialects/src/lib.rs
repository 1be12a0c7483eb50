//! `v3c-dialects`: the `v3` MLIR dialect, defined in IRDL (`dialects/irdl/v3.irdl.mlir`) and loaded
//! when a context is created, with one typed Rust builder per op. Op-name strings live only here.
//!
//! Empty until the dialect issue lands; the crate exists now so the workspace layout is final.
