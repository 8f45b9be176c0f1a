//! `btm rollback`: switch the volume to a snapshot (`-s`), back to the
//! line the last rollback left (`--undo`), or to any kept branch
//! (`--branch`). Destroys nothing: the line left becomes a branch. Shows
//! the plan first, asks on a terminal, and needs `--yes` anywhere else.
use std::io::Write;

use anyhow::{bail, Result};
use clap::Args;

use btm::preserve::{self, RelPath};
use btm::rollback::Ask;
use btm::volume::branch::Carry;
use btm::volume::{BranchName, Enter, Label};

use super::{human_bytes, VolumeArgs};

/// Arguments of `btm rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    volume: VolumeArgs,
    /// Target height; absent or negative means the latest snapshot
    #[arg(short = 's', long = "snapshot-id", alias = "height", value_name = "HEIGHT", allow_negative_numbers = true, default_value_t = -1)]
    snapshot_id: i64,
    /// Fail unless a snapshot exists at exactly that height
    #[arg(short = 'S', long)]
    strict: bool,
    /// Roll back to the snapshot protected with LABEL (an upgrade's, taken
    /// before it: the way back from a failed upgrade)
    #[arg(long, value_name = "LABEL", conflicts_with_all = ["snapshot_id", "strict"])]
    to_protected: Option<Label>,
    /// Go back to the line the newest rollback left (itself kept as a
    /// branch, so undo can be undone)
    #[arg(long, conflicts_with_all = ["snapshot_id", "strict", "to_protected", "branch"])]
    undo: bool,
    /// Make the kept branch NAME the active line (see `btm branches`)
    #[arg(long, value_name = "NAME", conflicts_with_all = ["snapshot_id", "strict", "to_protected"])]
    branch: Option<BranchName>,
    /// Name the branch the line being left becomes [default: the time, 20261206T120000Z]
    #[arg(long, value_name = "NAME")]
    keep_as: Option<BranchName>,
    /// Do not ask for confirmation
    #[arg(short = 'y', long)]
    yes: bool,
    /// Also keep the current content of this file (relative to the volume
    /// root); validator signing state is kept without it
    #[arg(long, value_name = "PATH", value_parser = parse_relpath)]
    preserve: Vec<RelPath>,
    /// Roll back everything, validator signing state included (it can make
    /// a validator double-sign)
    #[arg(long, conflicts_with = "preserve")]
    no_preserve: bool,
    /// Configuration file, for its `preserve` key [default: /etc/btm/btm.toml when it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
}

/// The height of the snapshot protected with `label` (exactly one).
fn protected_height(ops: &btm::Ops, label: &Label) -> Result<u64> {
    match ops.protected_with(label)?.as_slice() {
        [h] => Ok(*h),
        many => {
            bail!(
            "{} snapshots are protected with label '{label}' ({}); roll back by height (-s H -S)",
            many.len(),
            many.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        )
        }
    }
}

/// What a switch carries across, why each, and whether it is signing
/// state (carried only when not older than the entering copy).
fn carried(args: &RollbackArgs, root: &std::path::Path) -> Result<Vec<(RelPath, String, bool)>> {
    if args.no_preserve {
        return Ok(Vec::new());
    }
    let mut out: Vec<(RelPath, String, bool)> = Vec::new();
    for found in btm::validator::find_signing_state(root)? {
        out.push((found.path, found.stack.to_owned(), true));
    }
    let file = super::daemon::load_file(args.config.as_deref())?;
    for p in file.preserve.iter().flatten() {
        let rel: RelPath = p
            .parse()
            .map_err(|e: preserve::Error| anyhow::anyhow!("config key preserve: {e}"))?;
        out.push((rel, "preserve in the configuration".into(), false));
    }
    for p in &args.preserve {
        out.push((p.clone(), "--preserve".into(), false));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|(p, _, _)| seen.insert(p.clone()));
    Ok(out)
}

fn parse_relpath(s: &str) -> Result<RelPath, String> {
    s.parse().map_err(|e: preserve::Error| e.to_string())
}

/// Where the switch goes and the branch it keeps.
fn print_effects(
    out: &mut dyn Write,
    ops: &btm::Ops,
    ask: &Ask,
    vol: &dyn btm::volume::Volume,
    sw: &btm::volume::Switch,
    fx: &btm::volume::SwitchEffects,
) -> Result<()> {
    match (ask, &fx.enter) {
        (
            Ask::Rollback {
                target: Some(t), ..
            },
            Enter::Snapshot { height },
        ) if t != height => writeln!(
            out,
            "No snapshot at height {t}; the closest below is {height}."
        )?,
        _ => {}
    }
    match &fx.enter {
        Enter::Snapshot { height } => {
            writeln!(
                out,
                "Roll back {} ({}) to height {height}.",
                vol.name(),
                vol.mode()
            )?;
            let record = btm::window::records(ops.dirs(), vol.name())
                .get(height)
                .copied()
                .unwrap_or_default();
            if let Some(d) = record.durable.filter(|d| d != height) {
                writeln!(
                    out,
                    "WARNING: the snapshot labelled {height} holds the node's state at height {d} (the write forced before it said so): the node will restart at {d}.",
                )?;
            }
        }
        Enter::Branch { name } => writeln!(
            out,
            "Make branch {name} the active line of {} ({}): its live state, with its snapshots {}.",
            vol.name(),
            vol.mode(),
            super::height_list(&fx.moves_in)
        )?,
    }
    let space = fx.kept_bytes.map_or("unknown".to_owned(), human_bytes);
    let newer = match fx.moves_out.len() {
        0 => "no newer snapshots".to_owned(),
        n => format!(
            "{n} newer snapshot(s) ({})",
            super::height_list(&fx.moves_out)
        ),
    };
    writeln!(
        out,
        "Kept as branch {}: the current live state and {newer}; space it holds: {space}. Nothing is destroyed; `btm rollback --undo` comes back.",
        sw.keep_as,
    )?;
    Ok(())
}

/// What the switch will do, before asking.
fn print_plan(
    out: &mut dyn Write,
    ops: &btm::Ops,
    ask: &Ask,
    prepared: &btm::PreparedSwitch,
    carry: &[(RelPath, String, bool)],
    no_preserve: bool,
) -> Result<()> {
    let vol = prepared.volume();
    let sw = prepared.switch();
    match prepared.effects() {
        None => writeln!(
            out,
            "Finishing `{}`, left half done: {} ({}) is kept as branch {}.",
            sw.command,
            vol.name(),
            sw.reason,
            sw.keep_as
        )?,
        Some(fx) => print_effects(out, ops, ask, vol, sw, fx)?,
    }
    for (p, why, signing) in carry {
        let how = if *signing {
            ", unless the entering copy is newer"
        } else {
            ""
        };
        writeln!(
            out,
            "Current content kept: {} ({why}{how})",
            p.as_path().display()
        )?;
    }
    if no_preserve {
        writeln!(
            out,
            "--no-preserve: validator signing state is rolled back too; a validator restarted on it can double-sign."
        )?;
    }
    writeln!(out, "Stop the node using this volume before rolling back.")?;
    out.flush()?;

    Ok(())
}

pub fn run(args: RollbackArgs, out: &mut dyn Write) -> Result<()> {
    let ops = args.volume.plain_cfg()?.ops()?;
    let ask = if args.undo {
        Ask::Undo
    } else if let Some(b) = &args.branch {
        Ask::Branch(b.clone())
    } else {
        match &args.to_protected {
            Some(label) => Ask::Rollback {
                target: Some(protected_height(&ops, label)?),
                strict: true,
            },
            None => Ask::Rollback {
                target: u64::try_from(args.snapshot_id).ok(),
                strict: args.strict,
            },
        }
    };
    let pending = ops.pending_switch()?;
    let carry = match &pending {
        Some(_) => Vec::new(),
        None => carried(&args, &ops.volume().root()?)?,
    };
    let paths: Vec<RelPath> = carry.iter().map(|(p, _, _)| p.clone()).collect();
    if pending.is_none() {
        preserve::check_sources(&ops.volume().root()?, &paths)?;
    }
    let journal_carry = carry
        .iter()
        .map(|(p, _, signing)| Carry {
            path: p.as_path().display().to_string(),
            newest_wins: *signing,
        })
        .collect();
    let prepared = ops.prepare_switch(
        &ask,
        args.keep_as.clone(),
        journal_carry,
        chrono::Utc::now(),
    )?;
    let sw = prepared.switch().clone();
    print_plan(out, &ops, &ask, &prepared, &carry, args.no_preserve)?;
    super::confirm(args.yes, "rolling back")?;
    // A testing aid: stop after the named step, as a crash would.
    let crash = std::env::var("BTM_CRASH_AFTER").ok();
    let command = sw.command.clone();
    prepared.execute(crash.as_deref()).map_err(|e| match e {
        // It says so itself.
        btm::Error::Volume(btm::volume::Error::Interrupted(_)) => anyhow::Error::from(e),
        e => anyhow::Error::from(e).context(format!(
            "the rollback stopped part way, destroying nothing; once the cause is fixed, `{command}` finishes it"
        )),
    })?;
    match &sw.enter {
        Enter::Snapshot { height } => writeln!(
            out,
            "rolled back to height {height}; kept branch {}",
            sw.keep_as
        )?,
        Enter::Branch { name } => {
            writeln!(out, "switched to branch {name}; kept branch {}", sw.keep_as)?
        }
    }
    Ok(())
}
