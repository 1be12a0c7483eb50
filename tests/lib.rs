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

/// Expands every entry of the GPU artifact in `dir` into kernel launches — at the planned sizes and
/// at `sizes` — over made-up device addresses (256-byte aligned, as the driver's), and checks each
/// launch against its kernel's PTX: as many 8-byte parameters as the `.entry` declares, a non-empty
/// grid; tensor maps are checked against TMA's rules by the expansion itself. Returns (launches
/// checked, distinct kernels launched).
pub fn check_gpu_launches(dir: &std::path::Path, sizes: &[(&str, v3c_runtime::plan::Sizes)]) -> (usize, usize) {
    use std::collections::{BTreeSet, HashMap};
    use v3c_runtime::gpu::{rope_key, Action, Bindings, Expander};
    use v3c_runtime::plan::BufferKind;
    let artifact = v3c_runtime::artifact::Artifact::open(dir).unwrap();
    let expander = Expander::new(&artifact).unwrap();
    // Only the weights kernels read as they are get memory (as the executor binds them).
    let direct = expander.direct_weights().unwrap();
    let mut next = 0x7f00_0000_0000u64;
    let mut addr = || {
        next += 1 << 32;
        next
    };
    let mut b = Bindings::default();
    for e in &artifact.plan.entries {
        for buf in &e.buffers {
            match &buf.kind {
                BufferKind::Input { name } => {
                    b.inputs.entry(name.clone()).or_insert_with(&mut addr);
                }
                BufferKind::Weight { name } if direct.contains(name) => {
                    b.weights.entry(name.clone()).or_insert_with(&mut addr);
                }
                BufferKind::Weight { .. } => {}
                BufferKind::Arena { .. } => {}
            }
        }
    }
    for p in expander.prepared_weights().unwrap() {
        b.prepared.insert(p.key.clone(), (addr(), Some(addr())));
    }
    for (t, _) in expander.rope_tables() {
        b.rope.insert(rope_key(&t), addr());
    }
    (b.arena, b.temps, b.workspace, b.counters) = (addr(), addr(), addr(), addr());
    let ptx: HashMap<String, String> = artifact
        .manifest
        .kernels
        .iter()
        .map(|k| (k.name.clone(), std::fs::read_to_string(artifact.path(&k.file)).unwrap()))
        .collect();
    let (mut launches, mut kernels) = (0, BTreeSet::new());
    let planned: Vec<(&str, v3c_runtime::plan::Sizes)> =
        artifact.plan.entries.iter().map(|e| (e.name.as_str(), e.sizes)).collect();
    for &(entry, at) in planned.iter().chain(sizes) {
        let plan = expander.entry(entry).unwrap();
        let (actions, _) = expander.expand(plan, at, &b, 132).unwrap_or_else(|e| panic!("{entry} at {at:?}: {e}"));
        for a in actions {
            let Action::Kernel(k) = a else { continue };
            let declared = v3c_runtime::abi::ptx_entry_params(&ptx[&k.kernel], &k.kernel).unwrap();
            assert_eq!(k.params.len(), declared, "{entry} at {at:?}: {} takes {declared} parameters", k.kernel);
            assert!(k.grid > 0, "{entry}: {} with an empty grid", k.kernel);
            launches += 1;
            kernels.insert(k.kernel);
        }
    }
    (launches, kernels.len())
}
