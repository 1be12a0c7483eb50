//! The external tools the compiler uses, where they are, and what is lost without each.
//!
//! Search order for each tool (first hit wins):
//! 1. the project folder: `.tools/bin/` of the checkout, where `scripts/bootstrap.sh` installs the
//!    PyPI wheels (looked for above the running executable, then above the current directory);
//! 2. `PATH`;
//! 3. an environment variable naming the binary (`V3C_PTXAS`, `V3C_CUOBJDUMP`, `V3C_NVDISASM`).
//!
//! A missing tool is never fatal by itself: callers ask [`Tool::missing_consequence`] for the one
//! line to print ("no ptxas: emitting PTX only, no cubin").

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An external NVIDIA tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// PTX -> cubin assembler; also reports registers, shared memory and spills.
    Ptxas,
    /// Dumps SASS from a cubin (needs nvdisasm beside it or on PATH).
    Cuobjdump,
    /// The SASS disassembler cuobjdump calls.
    Nvdisasm,
}

impl Tool {
    pub const ALL: [Tool; 3] = [Tool::Ptxas, Tool::Cuobjdump, Tool::Nvdisasm];

    pub fn binary_name(self) -> &'static str {
        match self {
            Tool::Ptxas => "ptxas",
            Tool::Cuobjdump => "cuobjdump",
            Tool::Nvdisasm => "nvdisasm",
        }
    }

    /// The environment variable that may name this tool's binary.
    pub fn env_var(self) -> &'static str {
        match self {
            Tool::Ptxas => "V3C_PTXAS",
            Tool::Cuobjdump => "V3C_CUOBJDUMP",
            Tool::Nvdisasm => "V3C_NVDISASM",
        }
    }

    /// One line saying what the compiler cannot do without this tool.
    pub fn missing_consequence(self) -> &'static str {
        match self {
            Tool::Ptxas => {
                "no ptxas: emitting PTX only, no cubin (the driver JIT-compiles PTX at load; no register/spill report)"
            }
            Tool::Cuobjdump => "no cuobjdump: SASS checks (HGMMA/QGMMA/UTMALDG) are skipped",
            Tool::Nvdisasm => "no nvdisasm: cuobjdump cannot disassemble, SASS checks are skipped",
        }
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.binary_name())
    }
}

/// Where a tool was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    ProjectFolder,
    Path,
    EnvVar,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::ProjectFolder => "project .tools/bin",
            Origin::Path => "PATH",
            Origin::EnvVar => "environment variable",
        })
    }
}

/// A tool that exists and can be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundTool {
    pub tool: Tool,
    pub path: PathBuf,
    pub origin: Origin,
}

impl FoundTool {
    /// The CUDA release the tool reports (e.g. `13.0.88`), if it answers `--version`.
    pub fn version(&self) -> Option<String> {
        let out = Command::new(&self.path).arg("--version").output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "Cuda compilation tools, release 13.0, V13.0.88"
        text.lines().find_map(|l| l.split(", V").nth(1)).map(|v| v.trim().to_string())
    }
}

/// Why a tool could not be found: the places searched, in order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}; looked in {}", .tool.missing_consequence(), .searched.join(", "))]
pub struct MissingTool {
    pub tool: Tool,
    pub searched: Vec<String>,
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// `.tools/bin` folders of checkouts above the running executable and the current directory, and
/// of the checkout this binary was built from.
fn project_tool_dirs() -> Vec<PathBuf> {
    let mut starts = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for start in starts {
        for dir in start.ancestors() {
            let candidate = dir.join(".tools/bin");
            if candidate.is_dir() && !dirs.contains(&candidate) {
                dirs.push(candidate);
            }
        }
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin");
    if built_from.is_dir() && !dirs.iter().any(|d| same_file(d, &built_from)) {
        dirs.push(built_from);
    }
    dirs
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Finds `tool` in the project folder, then on PATH, then through its environment variable.
pub fn find(tool: Tool) -> Result<FoundTool, MissingTool> {
    find_in(tool, &project_tool_dirs(), std::env::var_os("PATH"), std::env::var_os(tool.env_var()))
}

/// [`find`] with its three sources given explicitly (for tests and for callers with their own PATH).
pub fn find_in(
    tool: Tool,
    project_dirs: &[PathBuf],
    path_var: Option<std::ffi::OsString>,
    env_value: Option<std::ffi::OsString>,
) -> Result<FoundTool, MissingTool> {
    let name = tool.binary_name();
    let found = |path: PathBuf, origin| Ok(FoundTool { tool, path, origin });
    for dir in project_dirs {
        let p = dir.join(name);
        if is_executable(&p) {
            return found(p, Origin::ProjectFolder);
        }
    }
    if let Some(path_var) = &path_var {
        for dir in std::env::split_paths(path_var) {
            let p = dir.join(name);
            if is_executable(&p) {
                return found(p, Origin::Path);
            }
        }
    }
    if let Some(value) = &env_value {
        let p = PathBuf::from(value);
        if is_executable(&p) {
            return found(p, Origin::EnvVar);
        }
    }
    let mut searched = vec![if project_dirs.is_empty() {
        "project .tools/bin (none found; run scripts/bootstrap.sh)".to_string()
    } else {
        project_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    }];
    searched.push("PATH".into());
    searched.push(match &env_value {
        Some(v) => format!("{}={} (not an executable file)", tool.env_var(), PathBuf::from(v).display()),
        None => format!("{} (unset)", tool.env_var()),
    });
    Err(MissingTool { tool, searched })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_tool(dir: &Path, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("v3c-toolchain-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn project_folder_wins_over_path_and_env() {
        let root = scratch("order");
        let project = root.join("project");
        let on_path = root.join("path");
        fake_tool(&project, "ptxas");
        let path_copy = fake_tool(&on_path, "ptxas");
        let found =
            find_in(Tool::Ptxas, &[project.clone()], Some(on_path.clone().into()), Some(path_copy.clone().into()))
                .unwrap();
        assert_eq!(found.origin, Origin::ProjectFolder);
        assert_eq!(found.version().as_deref(), Some("13.0.88"));
        let found = find_in(Tool::Ptxas, &[root.join("empty")], Some(on_path.into()), None).unwrap();
        assert_eq!(found.origin, Origin::Path);
        let found = find_in(Tool::Ptxas, &[], None, Some(path_copy.into())).unwrap();
        assert_eq!(found.origin, Origin::EnvVar);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn missing_tool_says_what_is_lost_and_where_it_looked() {
        let err = find_in(Tool::Ptxas, &[], Some("/nonexistent".into()), Some("/nope/ptxas".into())).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("no ptxas: emitting PTX only, no cubin"), "{msg}");
        assert!(msg.contains("V3C_PTXAS=/nope/ptxas (not an executable file)"), "{msg}");
        assert!(!msg.contains('\n'));
    }
}
