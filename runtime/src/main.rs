//! `v3r`: run v3c artifacts on a CUDA GPU. No compiler inside; see `v3r --help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use v3c_runtime::device;

/// Run DeepSeek-V3 artifacts compiled by `v3c` on an NVIDIA GPU.
///
/// `v3r` is the runtime half of v3c: it loads an artifact directory written by `v3c compile`
/// (kernels, launch plan, manifest), uploads weights from Hugging Face safetensors and runs
/// inference. It links no compiler, so it ships next to the artifact.
#[derive(Parser)]
#[command(name = "v3r", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "Examples:\n  v3r doctor                 # driver, GPU, compute capability, memory\n  v3r info out/deepseek-v3   # what an artifact holds\n  v3r run out/deepseek-v3 --weights /models/DeepSeek-V3 --prompt-tokens \"0 3 17\" --max-new-tokens 32"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace); V3C_LOG=<filter> overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report the CUDA driver and every GPU (name, compute capability, memory); works without a GPU.
    Doctor(DoctorArgs),
    /// Describe an artifact: target, model, entry points, kernels, and whether this machine can run it.
    Info(InfoArgs),
    /// Generate tokens with an artifact and a checkpoint; prints token ids and tokens/s.
    Run(RunArgs),
}

#[derive(Args)]
struct DoctorArgs {
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// Artifact directory written by `v3c compile` (holds manifest.json).
    artifact: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// Artifact directory written by `v3c compile`.
    artifact: PathBuf,
    /// Checkpoint directory in the Hugging Face layout (config.json + *.safetensors).
    #[arg(long, value_name = "DIR")]
    weights: PathBuf,
    /// Prompt as token ids separated by spaces, e.g. "0 3 17 250".
    #[arg(long, value_name = "IDS")]
    prompt_tokens: String,
    /// How many tokens to generate after the prompt.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_new_tokens: usize,
    /// CUDA device ordinal.
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
}

fn main() -> ExitCode {
    let cli: Cli = v3c_runtime::cli::parse_or_exit("v3r");
    v3c_runtime::cli::init_logging(cli.verbose);
    let result = match cli.command {
        Command::Doctor(a) => doctor(&a),
        Command::Info(a) => info(&a),
        Command::Run(a) => run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("v3r: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn doctor(args: &DoctorArgs) -> Result<(), String> {
    let probe = device::probe_devices();
    if args.json {
        let value = match &probe {
            Ok((driver, devices)) => serde_json::json!({
                "v3r_version": env!("CARGO_PKG_VERSION"),
                "driver": driver.version.to_string(),
                "devices": devices.iter().map(|d| serde_json::json!({
                    "ordinal": d.ordinal,
                    "name": d.name,
                    "compute_capability": [d.compute_capability.0, d.compute_capability.1],
                    "total_memory_bytes": d.total_memory_bytes,
                    "multiprocessors": d.multiprocessors,
                })).collect::<Vec<_>>(),
            }),
            Err(e) => serde_json::json!({
                "v3r_version": env!("CARGO_PKG_VERSION"),
                "driver": serde_json::Value::Null,
                "devices": [],
                "problem": e.to_string(),
            }),
        };
        println!("{value}");
        return Ok(());
    }
    println!("v3r {} (runtime; links no compiler)", env!("CARGO_PKG_VERSION"));
    match probe {
        Ok((driver, devices)) => {
            println!("CUDA driver: found, supports CUDA {}", driver.version);
            for d in &devices {
                let note =
                    if d.compute_capability == (9, 0) { "" } else { "  [not Hopper: sm_90a artifacts will not run]" };
                println!("GPU: {d}{note}");
            }
        }
        Err(e @ device::DeviceError::NoDriver) => {
            println!("CUDA driver: not found; {e}");
            println!("GPU: none (compiling works; running artifacts needs a GPU machine)");
        }
        Err(e) => {
            println!("CUDA driver: {e}");
            println!("GPU: none");
        }
    }
    Ok(())
}

fn require_artifact_dir(path: &Path) -> Result<(), String> {
    if !path.is_dir() {
        return Err(format!("{}: no such artifact directory", path.display()));
    }
    let manifest = path.join("manifest.json");
    if !manifest.is_file() {
        return Err(format!("{}: not a v3c artifact (no manifest.json)", path.display()));
    }
    Ok(())
}

fn info(args: &InfoArgs) -> Result<(), String> {
    require_artifact_dir(&args.artifact)?;
    Err(format!(
        "{}: reading artifacts is not implemented yet (the artifact format lands with the artifact/runtime issue)",
        args.artifact.display()
    ))
}

fn run(args: &RunArgs) -> Result<(), String> {
    require_artifact_dir(&args.artifact)?;
    if !args.weights.is_dir() {
        return Err(format!("{}: no such checkpoint directory", args.weights.display()));
    }
    v3c_runtime::cli::parse_token_ids(&args.prompt_tokens, "--prompt-tokens")?;
    device::probe_device(args.device).map_err(|e| e.to_string())?;
    Err("running artifacts is not implemented yet (it lands with the artifact/runtime issue)".into())
}
