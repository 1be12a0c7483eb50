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

/// What `v3r tune` reads of `v3c tune --emit-candidates` output: every candidate with its launch
/// convention, which launches the problem's operands as its kernel's PTX declares.
pub fn candidates_launch_as_their_ptx_declares(cands: &std::path::Path) {
    let set = v3c_runtime::tuning::Candidates::read(cands).unwrap();
    for p in &set.problems {
        for c in &p.candidates {
            let ptx = std::fs::read_to_string(cands.join("kernels").join(format!("{}.ptx", c.name))).unwrap();
            let declared = v3c_runtime::abi::ptx_entry_params(&ptx, &c.name).unwrap();
            if let Some(rows) = &p.rows {
                let launch =
                    v3c_runtime::measure::row_launch(rows, &c.name, &vec![1 << 40; rows.operands.len()]).unwrap();
                assert_eq!((launch.params.len(), launch.grid), (declared, p.m), "{}", c.name);
                continue;
            }
            if p.attention.is_some() {
                // Decode's six operands (queries, pool, table, lengths, outputs), prefill's four,
                // training's flash kernels' five or seven.
                let operands = match p.attention {
                    Some(v3c_runtime::tuning::AttentionProblem::Prefill { flash, .. }) => flash.operands().len(),
                    _ => 6,
                };
                let launch = v3c_runtime::measure::attention_launch(p, &c.name, &vec![1 << 40; operands], 132).unwrap();
                assert_eq!(launch.params.len(), declared, "{}", c.name);
                continue;
            }
            let abi = c.abi.as_ref().unwrap();
            assert_eq!(abi.split_k, c.name.contains("_splitk"), "{}", c.name);
            // The launch `v3r tune` makes for the problem, over made-up addresses.
            use v3c_runtime::abi::{Buf, GemmOperands};
            let el = if abi.input == "fp8" { "f8E4M3FN" } else { "bf16" };
            let buf = |shape: Vec<usize>, element: &'static str| Buf { addr: 1 << 40, shape, element };
            let (offsets, perm) = match p.grouped {
                Some(r) => v3c_runtime::tuning::route(p.m, r, 1),
                None => (vec![0, p.m as i32], Vec::new()),
            };
            let (groups, rows) = (offsets.len() - 1, if p.grouped.is_some() { perm.len() } else { p.m });
            let a_rows = if abi.grouping == "gather" { p.m } else { rows };
            let kb = p.k.div_ceil(128);
            let (a, b) = (buf(vec![a_rows, p.k], el), buf(vec![groups * p.n, p.k], el));
            let b_scale_rows = if abi.b_row_scales { groups * p.n } else { (groups * p.n).div_ceil(128) };
            let (sa, sb) = (buf(vec![a_rows, kb], "f32"), buf(vec![b_scale_rows, kb], "f32"));
            let out = buf(vec![if abi.scatter { p.m } else { rows }, p.n], "f32");
            let (res, offs) = (buf(vec![p.m, p.n], "f32"), buf(vec![groups + 1], "i32"));
            let (perm_buf, scale) = (buf(vec![rows], "i32"), buf(vec![rows], "f32"));
            let range = buf(vec![2], "i32");
            let ops = GemmOperands {
                a: &a,
                a2: Some(&a),
                a_scale: Some(&sa),
                b: &b,
                b_scale: Some(&sb),
                out: &out,
                residual: Some(&res),
                offsets: p.grouped.is_some().then_some(&offs),
                perm: p.grouped.is_some().then_some(&perm_buf),
                row_scale: Some(&scale),
                k_range: Some(&range),
                workspace: Some(1 << 41),
                counters: Some(1 << 42),
            };
            let launch = abi.launch(&c.name, &ops, 132).unwrap();
            assert_eq!(launch.params.len(), declared, "{}", c.name);
        }
    }
}

/// `v3r serve --http 127.0.0.1:0` with `args` after `serve` (artifact, flags) and `env`, killed
/// however a test ends (a failed assertion included).
pub struct HttpServer {
    child: std::process::Child,
    /// host:port, as the server said it on stderr.
    pub addr: String,
    /// Its `--api-key`, which [`HttpServer::request`] sends.
    key: Option<String>,
    /// The rest of its stderr, read as it comes (kept open: a server whose stderr is closed
    /// fails to write there).
    said: std::thread::JoinHandle<String>,
}

impl HttpServer {
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> HttpServer {
        let mut child = Command::new(workspace_binary("v3r"))
            .arg("serve")
            .args(args)
            .args(["--http", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("v3r serve starts");
        let mut said = std::io::BufReader::new(child.stderr.take().expect("its stderr"));
        let key = args.iter().position(|a| *a == "--api-key").and_then(|i| args.get(i + 1)).map(|k| k.to_string());
        let mut line = String::new();
        while !line.contains("serving ") {
            line.clear();
            let read = std::io::BufRead::read_line(&mut said, &mut line).unwrap_or(0);
            assert!(read > 0, "the server ended before it served");
        }
        let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("").to_string();
        let said = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut said, &mut rest);
            rest
        });
        HttpServer { child, addr, key, said }
    }

    /// Sends it `signal` (`kill -SIGNAL`).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{signal}");
    }

    /// Waits for it to end: how it ended, and what it said on stderr after it began serving.
    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().expect("it ends");
        let said = std::mem::replace(&mut self.said, std::thread::spawn(String::new));
        (status, said.join().unwrap_or_default())
    }

    /// One request on its own connection (with the server's API key): the status line and the
    /// body of the reply.
    pub fn request(&self, method: &str, path: &str, body: &str) -> (String, String) {
        self.request_as(method, path, body, self.key.as_deref())
    }

    /// As [`HttpServer::request`], with `key` as the API key (None: no Authorization header).
    pub fn request_as(&self, method: &str, path: &str, body: &str, key: Option<&str>) -> (String, String) {
        let mut c = std::net::TcpStream::connect(&self.addr).expect("the server accepts");
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        std::io::Write::write_all(&mut c, request.as_bytes()).expect("the request is sent");
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut c, &mut reply).expect("a reply");
        let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
        (head.lines().next().unwrap_or("").to_string(), body.to_string())
    }

    /// The JSON events of a server-sent event stream's body (`data: [DONE]` left out).
    pub fn events(body: &str) -> Vec<serde_json::Value> {
        body.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).expect("a JSON event"))
            .collect()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
