//! What the two command-line tools (`v3r` here, `v3c` in the compiler) share: log set-up and
//! one-line usage errors.
//!
//! Logging: warnings by default, `-v` info, `-vv` debug, `-vvv` trace; `V3C_LOG` (an env-filter
//! string such as `v3c_compiler=debug`) overrides. Usage errors (unknown flag, bad value, missing
//! argument) print ONE line naming the problem and exit with code 2; `--help` and `--version` print
//! as usual and exit 0.

use std::process::exit;

/// Parses the process arguments into `C`, turning any usage error into one line on stderr and
/// exit code 2.
pub fn parse_or_exit<C: clap::Parser>(tool: &str) -> C {
    match C::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // clap renders "error: ...", maybe a list of missing arguments, a tip, then Usage: ...;
            // keep everything before the usage block, folded into one line.
            let rendered = e.render().to_string();
            let parts: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let joined = parts.join(" ");
            let first = joined.strip_prefix("error: ").unwrap_or(&joined);
            eprintln!("{tool}: error: {first} (see '{tool} --help')");
            exit(2);
        }
    }
}

/// Installs the global log subscriber writing to stderr. Calling it twice is harmless.
pub fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = std::env::var("V3C_LOG")
        .ok()
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(verbosity >= 2)
        .try_init();
}
