//! `btm restore`: a backup into a directory, in place (`--live`: see
//! [`super::live`]).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use regex::bytes::Regex;

use btm_chunk::localfs::Owners;
use btm_chunk::public::mirrors::PlaceReport;
use btm_chunk::restore::RestoreOptions;

use super::progress::Reporter;
use btm_daemon::chain::{self, Chain};

use super::store::{find_backup_of, parse_regex, workers, StoreArgs};
use super::{human_bytes, print_json};

/// Arguments of `btm restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// [NAME|latest] DIR: a backup name, or `latest` (the default: the
    /// newest with --tag, at most --height), then the directory to restore
    /// into (created if missing; restored in place)
    #[arg(value_name = "NAME|latest> <DIR", num_args = 1..=2, required = true)]
    target: Vec<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    /// With `latest`: the tag, matched exactly
    #[arg(short = 't', long, env = "BTM_TAG", default_value = "default")]
    tag: String,
    /// With `latest`: the newest backup whose metadata height is at most H
    #[arg(long, value_name = "H", env = "BTM_HEIGHT")]
    height: Option<u64>,
    /// With `latest`: the newest backup of this chain (the chain id or
    /// genesis hash its metadata records)
    #[arg(long, value_name = "ID", env = "BTM_CHAIN")]
    chain: Option<String>,
    /// Restore even into a directory known to hold another chain than the
    /// backup's (by btm's record of the last restore into it, or its
    /// CometBFT genesis.json)
    #[arg(long)]
    allow_other_chain: bool,
    /// Only restore paths matching this regular expression
    #[arg(long, value_parser = parse_regex)]
    filter: Option<Regex>,
    /// Remove local files that are not in the backup
    #[arg(long)]
    delete: bool,
    /// Overwrite local validator signing state (data/priv_validator_state.json,
    /// slashing-protection databases) with the backup's copy, which may be
    /// older: a validator restarted on it can double-sign
    #[arg(long)]
    overwrite_signing_state: bool,
    /// Also read the store from this URL, a mirror serving a copy of it
    /// (repeatable): reads are spread over every place in proportion to
    /// its speed, and one that fails, stalls or serves bad bytes is set
    /// aside. Each is checked against the same signed catalog
    #[arg(long, value_name = "URL")]
    mirror: Vec<String>,
    /// Do not use the mirrors the store's catalog lists
    #[arg(long)]
    no_listed_mirrors: bool,
    /// Download at most SIZE a second (e.g. 50M) [default: no limit]
    #[arg(long, value_name = "SIZE", env = "BTM_MAX_RATE", value_parser = super::store::parse_rate)]
    max_rate: Option<u64>,
    /// Give files the backup's owners even when not run as root, and fail
    /// if that cannot be done [default: as root only; anyone else gets
    /// files of their own, content, modes and times exact, as tar does]
    #[arg(long, conflicts_with = "no_same_owner")]
    same_owner: bool,
    /// Leave files to the restoring user (and the directory's group), even
    /// as root
    #[arg(long)]
    no_same_owner: bool,
    /// Worker threads [default: twice the cores, 4 to 8]
    #[arg(long)]
    workers: Option<usize>,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
    /// Serve the backup at DIR at once (a FUSE mount), fetching what is
    /// read on demand and the rest in the background; DIR must be empty.
    /// `btm live finish DIR` ends it (docs/live-restore.md)
    #[arg(long, conflicts_with_all = ["filter", "delete", "overwrite_signing_state", "json", "mirror", "max_rate", "same_owner", "no_same_owner"])]
    live: bool,
    /// With --live: how long a read waits for the store before it fails
    /// with an I/O error
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration, requires = "live")]
    read_timeout: std::time::Duration,
    /// With --live: never use FUSE passthrough, even where the kernel has it
    #[arg(long, requires = "live")]
    no_passthrough: bool,
    /// With --live: on SIGTERM with every byte local, finish (as `btm live
    /// finish`) once nothing uses the directory, instead of stopping to
    /// resume later; a Kubernetes sidecar is stopped after its node
    #[arg(long, requires = "live")]
    finish_on_stop: bool,
}

impl RestoreArgs {
    /// (name, dir): one argument is the directory, with `latest` implied.
    fn name_and_dir(&self) -> Result<(String, PathBuf)> {
        match self.target.as_slice() {
            [dir] => Ok(("latest".to_owned(), dir.clone())),
            [name, dir] => Ok((
                name.to_str()
                    .context("the backup name is not valid UTF-8")?
                    .to_owned(),
                dir.clone(),
            )),
            _ => bail!("restore takes [NAME|latest] DIR"),
        }
    }
}

pub fn run(mut args: RestoreArgs, out: &mut dyn Write) -> Result<()> {
    let (wanted, dir) = args.name_and_dir()?;
    if args.live {
        return super::live::restore_live(super::live::LiveRestore {
            wanted,
            dir,
            store: &args.store,
            tag: &args.tag,
            height: args.height,
            chain: args.chain.as_deref(),
            read_timeout: args.read_timeout,
            passthrough: !args.no_passthrough,
            finish_on_stop: args.finish_on_stop,
        });
    }
    let (store, mirrors) = args
        .store
        .open_mirrored(&args.mirror, !args.no_listed_mirrors)?;
    let records = chain::records_dir();
    let opts = RestoreOptions {
        filter: args.filter.take(),
        delete: args.delete,
        workers: workers(args.workers)?,
        overwrite_signing_state: args.overwrite_signing_state,
        max_rate: args.max_rate,
        records: args.store.records_dir(),
        owners: owners(args.same_owner, args.no_same_owner),
        ..RestoreOptions::new(btm_daemon::node_policy())
    };
    // The lookup runs while the restore's lease is taken (two round trips
    // each to a remote store); its own errors are kept here, whole.
    let refused = std::sync::Mutex::new(None);
    let find = || {
        find_for(&args, store.as_ref(), &wanted, &dir, records.as_deref()).map_err(|e| {
            *refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            btm_chunk::ChunkError::Cancelled
        })
    };
    let reporter = Reporter::start(format!("restoring {wanted}"), Arc::clone(&opts.progress));
    let repo = args.store.repo(&store);
    let found = btm_chunk::restore::restore_found(&repo, find, &dir, &opts);
    drop(reporter);
    if let Some(e) = refused.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let (name, backup_chain) = match &found.backup {
        Some((name, idx)) => (name.clone(), Chain::of_meta(idx.meta())),
        None => (wanted, None),
    };
    let places = mirrors.map(|m| m.report()).unwrap_or_default();
    let summary = match found.result {
        // Refused before anything was changed: running it again cannot help.
        Err(e @ btm_chunk::ChunkError::Unrestorable { .. }) => return Err(e.into()),
        // Neither can it when this user may not give files their owners.
        Err(e) if opts.owners == Owners::Recorded && not_permitted(&e) => bail!(
            "restore of {name} into {} stopped: --same-owner, but only root can give files the backup's owners (without it they become this user's): {e}",
            dir.display()
        ),
        r => r.with_context(|| {
            format!(
                "restore of {name} into {} failed{}; run it again to finish it",
                dir.display(),
                set_aside(&places)
            )
        })?,
    };
    super::store::remember_chain(&dir, &name, backup_chain);
    if args.json {
        return print_json(
            out,
            &serde_json::json!({ "name": name, "summary": summary, "mirrors": places }),
        );
    }
    print_summary(out, &name, &summary)?;
    print_places(out, &places)
}

/// The backup `wanted` names, refused if `dir` is known to hold another
/// chain than the backup's (unless `--allow-other-chain`).
fn find_for(
    args: &RestoreArgs,
    store: &dyn btm_chunk::store::Store,
    wanted: &str,
    dir: &std::path::Path,
    records: Option<&std::path::Path>,
) -> Result<(String, btm_chunk::format::head::Decoded)> {
    let (name, idx) = find_backup_of(store, wanted, &args.tag, args.height, args.chain.as_deref())?;
    if !args.allow_other_chain {
        refuse_other_chain(&name, Chain::of_meta(idx.meta()).as_ref(), dir, records)?;
    }
    Ok((name, idx))
}

/// Whether `e` comes of an operation this (non-root) user is not
/// permitted.
fn not_permitted(e: &btm_chunk::ChunkError) -> bool {
    matches!(e, btm_chunk::ChunkError::Io { cause, .. } if cause.raw_os_error() == Some(libc::EPERM))
        && !nix::unistd::geteuid().is_root()
}

/// Whose files the restore makes: `--same-owner`, `--no-same-owner`, else
/// tar's rule (the backup's owners for root only).
fn owners(same: bool, not_same: bool) -> Owners {
    match (same, not_same) {
        (true, _) => Owners::Recorded,
        (_, true) => Owners::Restorer,
        _ => Owners::for_this_process(),
    }
}

/// " (set aside: URL (why), ...)" for the places a failed run set aside.
fn set_aside(places: &[PlaceReport]) -> String {
    let aside: Vec<String> = places
        .iter()
        .filter_map(|p| Some(format!("{} ({})", p.url, p.set_aside.as_deref()?)))
        .collect();
    if aside.is_empty() {
        return String::new();
    }
    format!(" (mirrors set aside: {})", aside.join(", "))
}

/// With several places: what each served, and which were set aside.
fn print_places(out: &mut dyn Write, places: &[PlaceReport]) -> Result<()> {
    if places.len() < 2 {
        return Ok(());
    }
    for p in places {
        match &p.set_aside {
            None => writeln!(
                out,
                "mirror {}: {} in {} requests",
                p.url,
                human_bytes(p.bytes),
                p.requests
            )?,
            Some(why) => writeln!(
                out,
                "mirror {} set aside after {} in {} requests: {why}",
                p.url,
                human_bytes(p.bytes),
                p.requests
            )?,
        }
    }
    Ok(())
}

/// Refuse to restore backup `name` of `theirs` into `dir` when `dir` is
/// known to hold another chain; nothing is written then.
fn refuse_other_chain(
    name: &str,
    theirs: Option<&Chain>,
    dir: &std::path::Path,
    records: Option<&std::path::Path>,
) -> Result<()> {
    let Some(theirs) = theirs else {
        return Ok(());
    };
    let Some((ours, known)) = chain::of_directory(dir, records) else {
        return Ok(());
    };
    if let Some(d) = ours.differs(theirs) {
        bail!(
            "refusing to restore {name} ({}) into {}, which holds {} ({known}): the {} differs; nothing was written (--allow-other-chain restores it anyway)",
            theirs.describe(),
            dir.display(),
            ours.describe(),
            d.field
        );
    }
    Ok(())
}

/// What a restore did, for a person.
fn print_summary(
    out: &mut dyn Write,
    name: &str,
    summary: &btm_chunk::restore::RestoreSummary,
) -> Result<()> {
    writeln!(
        out,
        "restored {name}: {} files{}{}, {} scanned, {} chunks already right, {} fetched in {} requests ({} downloaded), {} written, {} holes{}",
        summary.files,
        match (summary.files_trusted, summary.files_known) {
            (0, 0) => String::new(),
            (t, 0) => format!(" ({t} completed by an earlier run)"),
            (0, k) => format!(" ({k} known from the last restore, not read)"),
            (t, k) => format!(" ({t} completed by an earlier run, {k} known from the last restore, not read)"),
        },
        match summary.links {
            0 => String::new(),
            n => format!(" and {n} hard links to them"),
        },
        human_bytes(summary.bytes_scanned),
        summary.chunks_reused,
        summary.chunks_fetched,
        summary.requests,
        human_bytes(summary.bytes_downloaded),
        human_bytes(summary.bytes_written),
        summary.holes,
        if summary.deleted > 0 { format!(", {} removed", summary.deleted) } else { String::new() }
    )?;
    if summary.owners == Owners::Restorer {
        writeln!(
            out,
            "owners not restored: the files belong to uid {} and the group new files get here (as root, or with --same-owner, they get the backup's)",
            nix::unistd::geteuid()
        )?;
    }
    for p in &summary.signing_state_kept {
        writeln!(
            out,
            "kept the local validator signing state {p}, whatever the backup holds (--overwrite-signing-state replaces it)"
        )?;
    }
    if summary.not_deleted > 0 {
        writeln!(
            out,
            "--delete kept {} local entr{} that the backup left out on purpose:",
            summary.not_deleted,
            if summary.not_deleted == 1 { "y" } else { "ies" }
        )?;
        for k in &summary.not_deleted_named {
            writeln!(out, "  kept {} ({})", k.path, k.why)?;
        }
        let unnamed = summary.not_deleted - summary.not_deleted_named.len() as u64;
        if unnamed > 0 {
            writeln!(out, "  and {unnamed} more (--json lists the first hundred)")?;
        }
    }
    Ok(())
}
