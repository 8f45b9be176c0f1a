//! `btm backups`: the backups in a store, and `btm backups show NAME`.

use std::io::Write;
use std::sync::Arc;

use anyhow::Result;
use clap::{Args, Subcommand};

use btm_chunk::format::tree::{EntryKind, Item};
use btm_chunk::store::Store;
use btm_chunk::{inventory, BackupInfo};
use btm_daemon::chain::Chain;
use btm_daemon::height::identity::ChainIdentity;

use super::store::StoreArgs;
use super::{human_bytes, print_json};

/// Arguments of `btm backups`.
#[derive(Debug, Args)]
pub struct BackupsArgs {
    #[command(subcommand)]
    show: Option<BackupsCommand>,
    #[command(flatten)]
    store: StoreArgs,
    /// Only backups with exactly this tag
    #[arg(short = 't', long)]
    tag: Option<String>,
    /// Only backups of this chain (the chain id or genesis hash their
    /// metadata records)
    #[arg(long, value_name = "ID")]
    chain: Option<String>,
    /// At most this many, newest first
    #[arg(long)]
    limit: Option<usize>,
    /// Also show metadata and sizes
    #[arg(long, conflicts_with = "json")]
    long: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// `btm backups show NAME`.
#[derive(Debug, Subcommand)]
pub enum BackupsCommand {
    /// Files, sizes and estimated disk size of one backup
    Show {
        /// The backup's name
        name: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: BackupsArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open_reader()?;
    if let Some(BackupsCommand::Show { name, json }) = &args.show {
        return show(&store, &args.store, name, *json, out);
    }
    let mut names = inventory::list_backups(store.as_ref(), args.tag.as_deref())?;
    if args.chain.is_none() {
        if let Some(n) = args.limit {
            names.truncate(n);
        }
        if !args.long && !args.json {
            for n in names {
                writeln!(out, "{n}")?;
            }
            return Ok(());
        }
    }
    let mut infos = read_infos(store.as_ref(), names)?;
    if let Some(chain) = &args.chain {
        let of_chain = |i: &BackupInfo| Chain::of_meta(&i.meta).is_some_and(|c| c.is(chain));
        infos.retain(of_chain);
        infos.truncate(args.limit.unwrap_or(usize::MAX));
        if !args.long && !args.json {
            for i in infos {
                writeln!(out, "{}", i.name)?;
            }
            return Ok(());
        }
    }
    if args.json {
        return print_json(out, &infos);
    }
    for mut i in infos {
        if let Some(e) = &i.error {
            writeln!(out, "{}  UNREADABLE: {e}", i.name)?;
            continue;
        }
        // The chain identity gets its own line: it is what `verify` checks.
        let chain = i.meta.remove("chain");
        let labelled = i.meta.get("height").and_then(serde_json::Value::as_u64);
        let durable = i
            .meta
            .get("durable_height")
            .and_then(serde_json::Value::as_u64);
        writeln!(
            out,
            "{}  {} files  {} logical  {} on disk  {}",
            i.name,
            i.files,
            human_bytes(i.logical_bytes),
            human_bytes(i.disk_bytes),
            serde_json::Value::Object(i.meta)
        )?;
        if let (Some(h), Some(d)) = (labelled, durable.filter(|d| Some(*d) != labelled)) {
            writeln!(
                out,
                "    WARNING: labelled {h}, but holds the node's state at height {d}: a rebuilt node starts at {d}"
            )?;
        }
        match chain.map(serde_json::from_value::<ChainIdentity>) {
            None => {}
            Some(Ok(c)) => writeln!(
                out,
                "    {} at height {}: {}",
                c.kind.name(),
                c.height,
                c.describe()
            )?,
            Some(Err(e)) => writeln!(out, "    chain identity unreadable: {e}")?,
        }
    }
    Ok(())
}

/// What the indexes `names` say; one that cannot be read is shown as such,
/// and the others still are.
fn read_infos(
    store: &dyn Store,
    names: Vec<btm_chunk::format::head::IndexName>,
) -> Result<Vec<BackupInfo>> {
    let mut infos = Vec::new();
    for n in names {
        let name = n.to_string();
        match inventory::read_index(store, &name) {
            Ok(idx) => infos.push(BackupInfo::of(&name, &idx)),
            Err(e @ btm_chunk::ChunkError::Index(_)) => infos.push(BackupInfo::unreadable(&n, &e)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(infos)
}

/// `btm backups show NAME`: the backup's entries, streamed.
fn show(
    store: &Arc<dyn Store>,
    args: &StoreArgs,
    name: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let idx = inventory::read_index(store.as_ref(), name)?;
    let info = BackupInfo::of(name, &idx);
    let repo = args.repo(store);
    let mut entries = repo.entries(name, &idx);
    if json {
        show_json(&idx, &info, &mut entries, out)
    } else {
        show_text(name, &idx, &info, &mut entries, out)
    }
}

/// `backups show --json`, streamed: a million entries are never one value
/// in memory.
fn show_json(
    idx: &btm_chunk::format::head::Decoded,
    info: &BackupInfo,
    entries: &mut inventory::Entries<'_>,
    out: &mut dyn Write,
) -> Result<()> {
    write!(out, "{{\"backup\":")?;
    serde_json::to_writer(&mut *out, info)?;
    write!(out, ",\"created\":")?;
    serde_json::to_writer(&mut *out, &idx.created())?;
    write!(out, ",\"chunk_size\":{},\"entries\":[", idx.chunk_size())?;
    let mut first = true;
    let mut pending: Option<serde_json::Value> = None;
    let flush = |v: serde_json::Value, out: &mut dyn Write, first: &mut bool| -> Result<()> {
        if !*first {
            write!(out, ",")?;
        }
        *first = false;
        serde_json::to_writer(&mut *out, &v)?;
        Ok(())
    };
    while let Some(item) = entries.next_item()? {
        match item {
            Item::Entry(e) => {
                if let Some(v) = pending.take() {
                    flush(v, out, &mut first)?;
                }
                let (kind, extra) = match &e.kind {
                    EntryKind::File { size } => {
                        ("file", serde_json::json!({ "size": size, "chunks": [] }))
                    }
                    EntryKind::Dir => ("dir", serde_json::json!({})),
                    EntryKind::Symlink { target } => (
                        "symlink",
                        serde_json::json!({ "target": String::from_utf8_lossy(target) }),
                    ),
                    EntryKind::Link { target } => (
                        "hardlink",
                        serde_json::json!({ "target": String::from_utf8_lossy(target) }),
                    ),
                };
                let mut v = serde_json::json!({
                    "path": e.display(), "type": kind, "mode": e.mode, "uid": e.uid,
                    "gid": e.gid, "mtime_ns": e.mtime_ns, "append_only": e.append_only,
                });
                if let (Some(m), Some(x)) = (v.as_object_mut(), extra.as_object()) {
                    m.extend(x.clone());
                }
                pending = Some(v);
            }
            Item::Chunks(chunks) => {
                if let Some(list) = pending.as_mut().and_then(|v| v["chunks"].as_array_mut()) {
                    list.extend(
                        chunks
                            .iter()
                            .map(|c| serde_json::json!({ "o": c.off, "l": c.len, "h": c.hash })),
                    );
                }
            }
        }
    }
    if let Some(v) = pending.take() {
        flush(v, out, &mut first)?;
    }
    writeln!(out, "]}}")?;
    Ok(())
}

/// `backups show`: a header, then one line per entry with its logical and
/// stored sizes.
fn show_text(
    name: &str,
    idx: &btm_chunk::format::head::Decoded,
    info: &BackupInfo,
    entries: &mut inventory::Entries<'_>,
    out: &mut dyn Write,
) -> Result<()> {
    writeln!(
        out,
        "backup {name}: format {}, tag {}, created {}, metadata {}",
        idx.format(),
        idx.tag(),
        idx.created().to_rfc3339(),
        serde_json::Value::Object(idx.meta().clone())
    )?;
    writeln!(
        out,
        "{} files, {} logical, about {} on disk (holes excluded)",
        info.files,
        human_bytes(info.logical_bytes),
        human_bytes(info.disk_bytes)
    )?;
    for x in idx.excluded().iter().filter(|x| x.matched > 0) {
        writeln!(
            out,
            "excluded: {} ({}; {} matched)",
            x.pattern, x.why, x.matched
        )?;
    }
    let mut current: Option<(btm_chunk::format::tree::Entry, u64)> = None;
    while let Some(item) = entries.next_item()? {
        match item {
            Item::Entry(e) => {
                if let Some((prev, data)) = current.take() {
                    print_entry(&prev, data, out)?;
                }
                current = Some((e, 0));
            }
            Item::Chunks(chunks) => {
                if let Some((_, data)) = current.as_mut() {
                    *data += chunks
                        .iter()
                        .filter(|c| c.hash.is_some())
                        .map(|c| c.len)
                        .sum::<u64>();
                }
            }
        }
    }
    if let Some((prev, data)) = current.take() {
        print_entry(&prev, data, out)?;
    }
    Ok(())
}

/// One line of `backups show`: sizes, mode and path.
fn print_entry(
    e: &btm_chunk::format::tree::Entry,
    data: u64,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    match &e.kind {
        EntryKind::File { size } => writeln!(
            out,
            "{:>10} {:>10}  {:o}  {}",
            human_bytes(*size),
            human_bytes(data),
            e.mode,
            e.display()
        ),
        EntryKind::Dir => writeln!(
            out,
            "{:>10} {:>10}  {:o}  {}/",
            "-",
            "-",
            e.mode,
            e.display()
        ),
        EntryKind::Symlink { target } => writeln!(
            out,
            "{:>10} {:>10}  link  {} -> {}",
            "-",
            "-",
            e.display(),
            String::from_utf8_lossy(target)
        ),
        EntryKind::Link { target } => writeln!(
            out,
            "{:>10} {:>10}  {:o}  {} => {} (hard link)",
            "-",
            "-",
            e.mode,
            e.display(),
            String::from_utf8_lossy(target)
        ),
    }
}
