//! `btm notify --height H`: the push client. Returns after the daemon has
//! taken the snapshot (or says why it did not).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use btm::protocol::Outcome;
use btm::volume::Label;

use super::print_json;

/// Arguments of `btm notify`.
#[derive(Debug, Args)]
pub struct NotifyArgs {
    /// The block height the node just committed
    #[arg(long, value_name = "H")]
    height: u64,
    /// Snapshot this height now whatever the interval, protected with LABEL
    /// (an upgrade's snapshot; see docs/cosmovisor.md); anything but a
    /// snapshot that exists afterwards is an error
    #[arg(long, value_name = "LABEL")]
    protect: Option<Label>,
    /// Control socket [default: /run/btm/btm.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Give up waiting for the answer after this long
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = btm_daemon::settings::parse_duration)]
    timeout: std::time::Duration,
    /// Print the daemon's answer as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: NotifyArgs, out: &mut dyn Write) -> Result<()> {
    let socket = args.socket.unwrap_or_else(btm::client::default_socket);
    let reply = match &args.protect {
        Some(l) => btm::client::notify_protected(&socket, args.height, l.as_str(), args.timeout)?,
        None => btm::client::notify(&socket, args.height, args.timeout)?,
    };
    if args.json {
        print_json(out, &reply)?;
    } else {
        let reason = reply.reason.as_deref().unwrap_or("");
        match reply.outcome {
            Outcome::Created => writeln!(
                out,
                "snapshot {} taken in {} ms",
                reply.snapshot.as_deref().unwrap_or("?"),
                reply.duration_ms.unwrap_or(0)
            )?,
            Outcome::Exists => writeln!(out, "snapshot at height {} already exists", reply.height)?,
            Outcome::Skipped => writeln!(out, "no snapshot at height {}: {reason}", reply.height)?,
            Outcome::Refused | Outcome::Failed => {}
        }
    }
    match reply.outcome {
        Outcome::Refused => bail!(
            "height {} refused: {}",
            reply.height,
            reply.reason.unwrap_or_default()
        ),
        Outcome::Failed => bail!(
            "no snapshot at height {}: {}",
            reply.height,
            reply.reason.unwrap_or_default()
        ),
        Outcome::Skipped if args.protect.is_some() => bail!(
            "no protected snapshot at height {}: {}",
            reply.height,
            reply.reason.unwrap_or_default()
        ),
        _ => {}
    }
    Ok(())
}
