//! Helpers shared by the integration tests: locating the built `v3c` / `v3r` binaries, and running
//! GPU tests only where a GPU is, saying why they were skipped elsewhere.

use std::path::PathBuf;
use std::process::{Command, Output};

use v3c_runtime::device::{self, DeviceInfo};

/// Path of a workspace binary (`v3c`, `v3r`) built in the same profile as the running test.
/// `cargo test --workspace` builds both (the compiler and runtime crates have integration tests).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile> folder");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo test --workspace` (or `cargo build --workspace`) first",
        path.display()
    );
    path
}

/// Runs a workspace binary with `args` and no stdin.
pub fn run_binary(name: &str, args: &[&str]) -> Output {
    run_binary_env(name, args, &[])
}

/// [`run_binary`] with extra environment variables.
pub fn run_binary_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(workspace_binary(name))
        .args(args)
        // Tests leave the user's kernel cache alone unless they name one.
        .env("V3C_KERNEL_CACHE", "off")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .env("COLUMNS", "100")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

/// The CUDA device a GPU test should use, or `None` after printing why the test is skipped
/// (cargo shows it with `--nocapture`; the test then passes without checking anything on a GPU).
pub fn gpu_or_skip(test: &str) -> Option<DeviceInfo> {
    match device::probe_device(0) {
        Ok(d) => Some(d),
        Err(reason) => {
            eprintln!("skipped {test}: {reason}");
            None
        }
    }
}

/// Expands every entry of the GPU artifact in `dir` into kernel launches at the planned sizes and
/// at `sizes`, each held against its kernel's PTX ([`v3c_runtime::gpu::Expander::check`]); panics
/// on the first mismatch. Returns (launches checked, distinct kernels launched).
pub fn check_gpu_launches(dir: &std::path::Path, sizes: &[(&str, v3c_runtime::plan::Sizes)]) -> (usize, usize) {
    let artifact = v3c_runtime::artifact::Artifact::open(dir).unwrap();
    let expander = v3c_runtime::gpu::Expander::new(&artifact).unwrap();
    let report = expander.check(sizes).unwrap_or_else(|e| panic!("{e}"));
    (report.launches, report.kernels)
}
