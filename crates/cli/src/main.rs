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

/// jemalloc, set in `.cargo/config.toml` to return freed pages at once.
/// glibc's allocator keeps the megabyte buffers of each pipeline thread
/// cached in per-thread arenas, which roughly doubled the peak RSS of a
/// backup or restore.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    cli::forget_empty_env();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("btm: error: {}", one_line(&render_chain(&e)));
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

/// The error and its causes, joined with ": ". Under the error policy
/// (see `btm::error`) every error prints its own cause and returns none
/// from `source()`, so each link of the chain is a context added here in
/// the binary, and nothing is repeated.
fn render_chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
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

/// Log to journald when running under systemd (`JOURNAL_STREAM` is set),
/// with structured fields (`HEIGHT`, `VOLUME`, `SNAPSHOT`, `DURATION_MS`);
/// otherwise to stderr in human-readable form. `level` (from `--log-level`
/// or the config file) wins over `RUST_LOG`, which wins over `default`.
/// Colour only for a person at a terminal: a pipe, a file, CI or a log
/// shipper gets plain text, and `NO_COLOR` (any value but empty) turns it
/// off everywhere (<https://no-color.org>).
fn colour() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && io::stderr().is_terminal()
}

pub(crate) fn init_logging(level: Option<&str>, default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).ok(),
        None => EnvFilter::try_from_default_env().ok(),
    }
    .unwrap_or_else(|| EnvFilter::new(default));
    // fuser warns when its own unmount finds the mount gone: a live
    // restore unmounts first, on purpose (docs/live-restore.md).
    let filter = match "fuser=error".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    let journald = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
        .map(|l| l.with_field_prefix(None));
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(io::stderr)
                    .with_ansi(colour())
                    .with_target(false),
            )
            .init(),
    }
}
