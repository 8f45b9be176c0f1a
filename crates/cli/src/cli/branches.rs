//! `btm branches`: the lines of history rollbacks kept, and dropping them.

use std::io::Write;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde::Serialize;

use btm::volume::{Branch, BranchName};

use super::{human_bytes, print_json, VolumeArgs};

/// Arguments of `btm branches`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BranchesArgs {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    volume: Option<VolumeArgs>,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Destroy branches and their snapshots (asks first)
    Drop(DropArgs),
}

#[derive(Debug, Args)]
struct DropArgs {
    #[command(flatten)]
    volume: VolumeArgs,
    /// The branches to drop
    #[arg(
        value_name = "NAME",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    names: Vec<BranchName>,
    /// Drop every branch
    #[arg(long)]
    all: bool,
    /// Do not ask for confirmation
    #[arg(short = 'y', long)]
    yes: bool,
}

#[derive(Serialize)]
struct Listing<'a> {
    volume: &'a str,
    branches: &'a [Branch],
    /// The switch left half done, if any.
    half_done: Option<String>,
}

fn describe(b: &Branch) -> String {
    let made = b.made.map_or("-".to_owned(), |m| {
        m.format("%Y-%m-%d %H:%M:%S").to_string()
    });
    let heights = match b.heights.as_slice() {
        [] => "no snapshots".to_owned(),
        hs => format!("snapshots {}", super::height_list(hs)),
    };
    let used = b.used.map_or("unknown".to_owned(), human_bytes);
    let mut line = format!(
        "{:<24}  {made:<19}  {:<28}  live state and {heights}; holds {used}",
        b.name,
        b.reason.as_deref().unwrap_or("-"),
    );
    if !b.protected.is_empty() {
        let labels: Vec<String> = b
            .protected
            .iter()
            .map(|(h, l)| format!("{h} ({l})"))
            .collect();
        line.push_str(&format!("; protected: {}", labels.join(", ")));
    }
    if !b.intact {
        line.push_str("; DAMAGED: its live state was removed by hand");
    }
    line
}

pub fn run(args: BranchesArgs, out: &mut dyn Write) -> Result<()> {
    match args.action {
        Some(Action::Drop(d)) => drop(d, out),
        None => {
            let Some(volume) = args.volume else {
                bail!("btm branches needs the volume: -p VOLUME or BTM_VOLUME");
            };
            let ops = volume.plain_cfg()?.ops()?;
            let branches = ops.branches()?;
            let half_done = ops.pending_switch()?.map(|p| p.command);
            if args.json {
                return print_json(
                    out,
                    &Listing {
                        volume: ops.volume().name(),
                        branches: &branches,
                        half_done,
                    },
                );
            }
            if let Some(c) = half_done {
                writeln!(
                    out,
                    "WARNING: a switch was left half done; run `{c}` again to finish it"
                )?;
            }
            if branches.is_empty() {
                writeln!(out, "no branches on {}", ops.volume().name())?;
            }
            for b in &branches {
                writeln!(out, "{}", describe(b))?;
            }
            Ok(())
        }
    }
}

fn drop(args: DropArgs, out: &mut dyn Write) -> Result<()> {
    let ops = args.volume.plain_cfg()?.ops()?;
    let branches = ops.branches()?;
    let doomed: Vec<&Branch> = if args.all {
        branches.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in &args.names {
            match branches.iter().find(|b| &b.name == n) {
                Some(b) => v.push(b),
                None => bail!("no branch named '{n}' (see `btm branches`)"),
            }
        }
        v
    };
    if doomed.is_empty() {
        writeln!(out, "no branches to drop")?;
        return Ok(());
    }
    writeln!(out, "This destroys, with no way back:")?;
    for b in &doomed {
        writeln!(out, "  {}", describe(b))?;
    }
    out.flush()?;
    super::confirm(args.yes, "dropping")?;
    for b in doomed {
        ops.drop_branch(&b.name)?;
        writeln!(out, "dropped branch {}", b.name)?;
    }
    Ok(())
}
