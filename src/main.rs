//! The `btm` binary: parse arguments, set up logging, run one verb, and map
//! the result to an exit status. Everything else lives in `cli/` and the
//! library.

mod cli;

use std::io;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Exit status for a failed command.
const EXIT_FAILURE: u8 = 1;
/// Exit status for unusable arguments (as clap uses).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(cli.log_level.as_deref());
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("btm: error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Help and version go to stdout with success; real usage errors are cut
/// to their first line so every bad input gets one clear line.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            // Clap's first paragraph is the message; the rest is usage and
            // tips. A hostile value may itself hold a newline: escape it.
            let rendered = e.render().to_string();
            let paragraph = rendered.split("\n\n").next().unwrap_or("invalid arguments");
            let msg = paragraph
                .trim()
                .trim_start_matches("error: ")
                .replace('\n', "\\n");
            eprintln!("btm: error: {msg}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn init_logging(level: Option<&str>) {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).ok(),
        None => EnvFilter::try_from_default_env().ok(),
    }
    .unwrap_or_else(|| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_target(false)
        .without_time()
        .init();
}
