//! `v3c doctor`: what this machine can do with v3c, checked rather than assumed.
//!
//! Each line is the result of doing the thing: an MLIR context is created and a module parsed and
//! verified; a kernel goes LLVM IR -> PTX for every target; when ptxas is present the PTX becomes a
//! cubin; the CUDA driver and GPUs are probed through the runtime (never panicking without them).

use std::path::Path;

use serde::Serialize;

use crate::target::{self, TARGETS};
use crate::toolchain::{self, Tool};

/// One checked fact: what, whether it works, and the detail a user needs.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// The whole report, printable as text or JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub compiler_version: String,
    pub checks: Vec<Check>,
}

impl Report {
    /// Does every check that the compiler itself needs pass? (Missing CUDA tools or GPU do not count:
    /// compiling works without them.)
    pub fn compiler_ok(&self) -> bool {
        self.checks.iter().filter(|c| c.what == "MLIR" || c.what.starts_with("LLVM")).all(|c| c.ok)
    }

    pub fn to_text(&self) -> String {
        let width = self.checks.iter().map(|c| c.what.len()).max().unwrap_or(0);
        let mut out = format!("v3c {}\n", self.compiler_version);
        for c in &self.checks {
            let mark = if c.ok { "ok  " } else { "--  " };
            out.push_str(&format!("{mark}{:width$}  {}\n", c.what, c.detail));
        }
        out
    }
}

fn check(what: impl Into<String>, result: Result<String, String>) -> Check {
    match result {
        Ok(detail) => Check { what: what.into(), ok: true, detail },
        Err(detail) => Check { what: what.into(), ok: false, detail },
    }
}

/// Runs every check. Takes a second or two (MLIR context creation, one PTX compile, one ptxas run).
pub fn run() -> Report {
    let mut checks = Vec::new();

    let (major, minor, patch) = inkwell::support::get_llvm_version();
    checks.push(check("LLVM", Ok(format!("{major}.{minor}.{patch}, linked statically (NVPTX backend)"))));

    checks.push(check("MLIR", mlir_smoke()));

    let ptxas = toolchain::find(Tool::Ptxas);
    for t in TARGETS {
        let ptx = target::emit_ptx(target::SMOKE_KERNEL_LL, "doctor.ll", t);
        checks.push(check(
            format!("LLVM -> PTX {}", t.name),
            ptx.as_ref()
                .map(|p| format!("PTX ISA {}.{}, {} bytes for a test kernel", t.ptx_isa.0, t.ptx_isa.1, p.len()))
                .map_err(|e| e.to_string()),
        ));
        if let (Ok(ptx), Ok(ptxas)) = (&ptx, &ptxas) {
            // Never from the kernel cache: the check is that ptxas runs.
            let cubin = target::assemble_with(ptx, "doctor.ptx", t, ptxas, None);
            checks.push(check(
                format!("PTX -> cubin {}", t.name),
                cubin
                    .map(|a| {
                        let regs = a.kernels.first().map(|k| k.registers).unwrap_or(0);
                        format!("{} bytes, test kernel uses {regs} registers", a.cubin.len())
                    })
                    .map_err(|e| e.to_string()),
            ));
        }
    }

    for tool in Tool::ALL {
        checks.push(check(
            tool.binary_name(),
            toolchain::find(tool)
                .map(|f| {
                    let version = f.version().map(|v| format!(", CUDA {v}")).unwrap_or_default();
                    format!("{} ({}{version})", f.path.display(), f.origin)
                })
                .map_err(|e| e.to_string()),
        ));
    }

    checks.push(check("kernel cache", kernel_cache()));

    let mlir_opt = Path::new(env!("MLIR_SYS_220_PREFIX")).join("bin/mlir-opt");
    checks.push(check(
        "mlir-opt",
        if mlir_opt.is_file() {
            Ok(mlir_opt.display().to_string())
        } else {
            Err(format!("{} not found: stock-tool checks of dumps are unavailable", mlir_opt.display()))
        },
    ));

    match v3c_runtime::device::probe_devices() {
        Ok((driver, devices)) => {
            checks.push(check("CUDA driver", Ok(format!("found, supports CUDA {}", driver.version))));
            for d in devices {
                let runs: Vec<_> = TARGETS.iter().filter(|t| t.runs_on(d.compute_capability)).map(|t| t.name).collect();
                let detail =
                    format!("{d}; runs: {}", if runs.is_empty() { "no v3c target".into() } else { runs.join(", ") });
                checks
                    .push(check(format!("GPU {}", d.ordinal), if runs.is_empty() { Err(detail) } else { Ok(detail) }));
            }
        }
        Err(e) => {
            checks.push(check("CUDA driver", Err(format!("{e}; compiling works, running needs a GPU machine"))));
        }
    }

    Report { compiler_version: env!("CARGO_PKG_VERSION").to_string(), checks }
}

fn mlir_smoke() -> Result<String, String> {
    let context = crate::mlir::new_context();
    let text = "func.func @smoke(%a: f32) -> f32 {\n  %b = arith.mulf %a, %a : f32\n  return %b : f32\n}\n";
    let module = crate::mlir::parse_module(&context, text, "doctor.mlir").map_err(|e| e.to_string())?;
    crate::mlir::verify(&context, &module, "doctor").map_err(|e| e.to_string())?;
    Ok(format!(
        "22 ({}), {} dialects loaded, parse + verify ok",
        env!("MLIR_SYS_220_PREFIX"),
        context.loaded_dialect_count()
    ))
}

/// Where kernels are cached, how many entries (CPU kernels, PTX, cubins) and bytes it holds, and whether
/// `cc` links CPU kernels.
fn kernel_cache() -> Result<String, String> {
    let Some(cache) = crate::kernel_cache::KernelCache::from_env() else {
        return Ok("off (V3C_KERNEL_CACHE=off, or no HOME): every kernel is compiled afresh every run".into());
    };
    let usage = cache.usage()?;
    let limit = crate::kernel_cache::limit_text()?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let linker = std::process::Command::new(&cc).arg("--version").output();
    let held = format!("{}: {usage}, {limit}", cache.dir().display());
    match linker {
        Ok(o) if o.status.success() => Ok(held),
        _ => Err(format!("{held}; '{cc}' cannot be run, so new kernels are not stored (set CC)")),
    }
}
