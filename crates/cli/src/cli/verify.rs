//! `btm verify`: prove that a node running on restored data is on the
//! exported chain at the exported height, by asking it for the block the
//! export recorded (`meta.chain`, see [`btm_daemon::height::identity`]),
//! in the dialect that recorded it. A node that has not reached that
//! height yet is "behind", not verified.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use btm_daemon::height::identity::{self, ChainIdentity};

use super::print_json;
use super::rpc::RpcAuthArgs;
use super::store::{find_backup, StoreArgs};

/// Arguments of `btm verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The backup: a name, or `latest` (the newest with --tag)
    #[arg(value_name = "NAME|latest", default_value = "latest")]
    backup: String,
    #[command(flatten)]
    store: StoreArgs,
    /// With `latest`: the tag, matched exactly
    #[arg(short = 't', long, default_value = "default")]
    tag: String,
    /// RPC of the node running on the restored data (http://…), asked in
    /// the dialect the export recorded
    #[arg(long, value_name = "URL")]
    rpc_url: String,
    #[command(flatten)]
    rpc: RpcAuthArgs,
    /// Print the result as JSON (and still exit non-zero unless verified)
    #[arg(long)]
    json: bool,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Verdict<'a> {
    backup: &'a str,
    verified: bool,
    recorded: &'a ChainIdentity,
    /// The node's tip, when it is below the recorded height.
    #[serde(skip_serializing_if = "Option::is_none")]
    behind_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    found: Option<&'a ChainIdentity>,
    mismatches: Vec<String>,
}

/// The node has not reached the backup's height yet: say so (and how far
/// it is), as JSON too when asked.
fn behind(
    args: &VerifyArgs,
    out: &mut dyn Write,
    name: &str,
    recorded: &ChainIdentity,
    tip: &btm_daemon::height::Tip,
) -> Result<()> {
    if args.json {
        print_json(
            out,
            &Verdict {
                backup: name,
                verified: false,
                recorded,
                behind_at: Some(tip.height),
                found: None,
                mismatches: Vec::new(),
            },
        )?;
    }
    bail!(
        "behind: at {}, expected {}: the node at {} has not reached {} {} of backup {name} yet{}",
        tip.height,
        recorded.height,
        args.rpc_url,
        recorded.kind.unit(),
        recorded.height,
        if tip.syncing {
            " (it says it is still syncing)"
        } else {
            ""
        }
    );
}

/// Another client version than the export's can read the same chain: a
/// warning, not a failure (an incompatible one shows as a node that will
/// not start).
fn warn_other_client(recorded: &ChainIdentity, found: &ChainIdentity) {
    if let (Some(was), Some(now)) = (&recorded.client, &found.client) {
        if was != now {
            eprintln!("warning: the export was made from {was}; the node runs {now}");
        }
    }
}

pub fn run(args: VerifyArgs, out: &mut dyn Write) -> Result<()> {
    // Checked before the store is opened: a bad URL is a usage error.
    args.rpc
        .node(btm::family::Dialect::Bitcoin, &args.rpc_url)?;
    let store = args.store.open_reader()?;
    let (name, idx) = find_backup(store.as_ref(), &args.backup, &args.tag, None)?;
    let recorded: ChainIdentity = match idx.meta().get("chain") {
        None => bail!(
            "backup {name} recorded no chain identity: it was not made by an export with a node RPC to ask (an RPC source, or rpc_url with rpc_kind)"
        ),
        Some(v) => serde_json::from_value(v.clone())
            .with_context(|| format!("backup {name} has an unreadable chain identity"))?,
    };
    let rpc = args.rpc.node(recorded.kind, &args.rpc_url)?;
    let tip = rpc.tip().with_context(|| {
        format!(
            "cannot verify backup {name}: the {} RPC at {} did not say its height",
            recorded.kind.name(),
            args.rpc_url
        )
    })?;
    if tip.height < recorded.height {
        return behind(&args, out, &name, &recorded, &tip);
    }
    let found = rpc.identity(recorded.height).with_context(|| {
        format!(
            "cannot verify backup {name}: block {} could not be read from {}",
            recorded.height, args.rpc_url
        )
    })?;
    let mismatches = identity::compare(&recorded, &found);
    warn_other_client(&recorded, &found);
    if args.json {
        print_json(
            out,
            &Verdict {
                backup: &name,
                verified: mismatches.is_empty(),
                recorded: &recorded,
                behind_at: None,
                found: Some(&found),
                mismatches: mismatches.iter().map(ToString::to_string).collect(),
            },
        )?;
    } else if mismatches.is_empty() {
        writeln!(
            out,
            "verified: backup {name} is on the node's chain at height {}: {}",
            recorded.height,
            recorded.describe()
        )?;
    }
    if let Some(first) = mismatches.first() {
        let rest: Vec<String> = mismatches[1..].iter().map(ToString::to_string).collect();
        bail!(
            "NOT verified: backup {name} and the node at {} differ at height {}: {first}{}",
            args.rpc_url,
            recorded.height,
            if rest.is_empty() {
                String::new()
            } else {
                format!("; {}", rest.join("; "))
            }
        );
    }
    Ok(())
}
