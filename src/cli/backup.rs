//! `btm backup`, `btm backups`, `btm restore` and `btm check`: the sparse
//! chunk engine from the command line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use regex::Regex;

use btm::chunk::backup::{BackupOptions, DEFAULT_CHUNK_SIZE};
use btm::chunk::restore::RestoreOptions;
use btm::chunk::{self, BackupInfo};
use btm::config::daemon::DEFAULT_CONFIG;
use btm::store::Store;

use super::{human_bytes, print_json};

/// Which store to use.
#[derive(Debug, Args)]
pub(super) struct StoreArgs {
    /// Store: a path, file://…, s3://bucket/prefix, gs://bucket/prefix or
    /// az://container/prefix [default: $BTM_STORE]
    #[arg(
        short = 's',
        long,
        env = "BTM_STORE",
        value_name = "STORE",
        global = true
    )]
    store: Option<String>,
}

impl StoreArgs {
    /// Open the store to write to it (created if it is a new directory).
    pub(super) fn open(&self) -> Result<Box<dyn Store>> {
        Ok(btm::store::open(&self.url()?)?)
    }

    /// Open a store that must already exist (listing, restore, check, gc).
    pub(super) fn open_existing(&self) -> Result<Box<dyn Store>> {
        Ok(btm::store::open_existing(&self.url()?)?)
    }

    /// The store: `-s`, else `$BTM_STORE`, else `[export] store` of
    /// /etc/btm/btm.toml.
    fn url(&self) -> Result<String> {
        let url = match &self.store {
            Some(url) => url.clone(),
            None => super::daemon::load_file(None)
                .ok()
                .and_then(|o| o.export)
                .and_then(|e| e.store)
                .with_context(|| {
                    format!("no store given: use -s STORE, set $BTM_STORE, or set [export] store in {DEFAULT_CONFIG}")
                })?,
        };
        Ok(url)
    }
}

fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| format!("bad regular expression: {e}"))
}

fn parse_meta(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("metadata must be a JSON object, like '{\"height\":120}'".into()),
        Err(e) => Err(format!("metadata is not JSON: {e}")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.to_ascii_uppercase() {
        u if u.ends_with("MIB") || u.ends_with('M') => (
            u.trim_end_matches("MIB").trim_end_matches('M').to_owned(),
            1 << 20,
        ),
        u if u.ends_with("KIB") || u.ends_with('K') => (
            u.trim_end_matches("KIB").trim_end_matches('K').to_owned(),
            1 << 10,
        ),
        u => (u, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size like 4M or 1024K"))
}

fn workers(n: Option<usize>) -> Result<usize> {
    match n {
        Some(0) => bail!("--workers must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(chunk::default_workers()),
    }
}

/// Arguments of `btm backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The directory to back up
    dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Tag; `latest` and incremental backups match it exactly
    #[arg(short = 't', long, default_value = "default")]
    tag: String,
    /// Metadata, a JSON object stored in the index (e.g. '{"height":120}')
    #[arg(short = 'm', long = "meta", value_name = "JSON", value_parser = parse_meta)]
    meta: Option<serde_json::Map<String, serde_json::Value>>,
    /// Only back up paths matching this regular expression
    #[arg(long, value_parser = parse_regex)]
    filter: Option<Regex>,
    /// A file (relative path) that only grows; repeatable
    #[arg(long = "appendonly", value_name = "RELPATH")]
    append_only: Vec<String>,
    /// Chunk size, e.g. 4M
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
    /// Read every file, even those unchanged since the previous backup
    #[arg(long)]
    force_read: bool,
    /// Keep a copy of uploaded chunks in this directory
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Worker threads [default: twice the cores, 4 to 8]
    #[arg(long)]
    workers: Option<usize>,
    /// zstd level
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    level: i32,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
}

pub fn backup(args: BackupArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open()?;
    let mut opts = BackupOptions::new(&args.tag);
    opts.meta = args.meta.unwrap_or_default();
    opts.filter = args.filter;
    opts.append_only = args.append_only;
    opts.chunk_size = args.chunk_size;
    opts.force_read = args.force_read;
    opts.cache = args.cache;
    opts.workers = workers(args.workers)?;
    opts.zstd_level = args.level;
    let reporter = Reporter::start(
        format!("backing up {}", args.dir.display()),
        Arc::clone(&opts.progress),
    );
    let result = chunk::backup::backup(store.as_ref(), &args.dir, &opts);
    drop(reporter);
    let summary = result.with_context(|| {
        format!(
            "backup of {} failed; no backup was written",
            args.dir.display()
        )
    })?;
    if args.json {
        return print_json(out, &summary);
    }
    writeln!(out, "{}", summary.name)?;
    print_summary(&summary);
    Ok(())
}

/// The one-line human summary of a backup, on stderr.
pub(super) fn print_summary(summary: &chunk::backup::BackupSummary) {
    eprintln!(
        "{} files ({} unchanged), {} scanned, {} read, {} uploaded in {} new chunks; {} chunks reused, {} empty",
        summary.files,
        summary.files_unchanged,
        human_bytes(summary.bytes_scanned),
        human_bytes(summary.bytes_read),
        human_bytes(summary.bytes_uploaded),
        summary.chunks_uploaded,
        summary.chunks_reused,
        summary.chunks_empty
    );
}

/// Shows `progress`: a bar on a terminal, a plain line every 10 s
/// otherwise. Stops when dropped.
pub(super) struct Reporter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    pub(super) fn start(what: String, progress: Arc<chunk::Progress>) -> Self {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let tty = std::io::stderr().is_terminal();
            let bar = if tty {
                let bar = indicatif::ProgressBar::new(0);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_message(what.clone());
                bar
            } else {
                indicatif::ProgressBar::hidden()
            };
            let mut last_line = std::time::Instant::now();
            while !flag.load(Ordering::Relaxed) {
                let (done, total) = (
                    progress.done.load(Ordering::Relaxed),
                    progress.total.load(Ordering::Relaxed),
                );
                bar.set_length(total);
                bar.set_position(done);
                if !tty && last_line.elapsed() >= std::time::Duration::from_secs(10) {
                    eprintln!(
                        "{what}: {} of {} processed",
                        human_bytes(done),
                        human_bytes(total)
                    );
                    last_line = std::time::Instant::now();
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        Reporter {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

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

pub fn backups(args: BackupsArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open_existing()?;
    if let Some(BackupsCommand::Show { name, json }) = args.show {
        let idx = chunk::read_index(store.as_ref(), &name)?;
        if json {
            return print_json(out, &idx);
        }
        let info = BackupInfo::of(&name, &idx);
        writeln!(
            out,
            "backup {name}: tag {}, created {}, metadata {}",
            idx.tag,
            idx.created.to_rfc3339(),
            serde_json::Value::Object(idx.meta.clone())
        )?;
        writeln!(
            out,
            "{} files, {} logical, about {} on disk (holes excluded)",
            info.files,
            human_bytes(info.logical_bytes),
            human_bytes(info.disk_bytes)
        )?;
        for e in &idx.entries {
            match &e.kind {
                chunk::index::EntryKind::File { size, chunks } => {
                    let data: u64 = chunks
                        .iter()
                        .filter(|c| c.hash.is_some())
                        .map(|c| c.len)
                        .sum();
                    writeln!(
                        out,
                        "{:>10} {:>10}  {:o}  {}",
                        human_bytes(*size),
                        human_bytes(data),
                        e.mode,
                        e.path
                    )?;
                }
                chunk::index::EntryKind::Dir => {
                    writeln!(out, "{:>10} {:>10}  {:o}  {}/", "-", "-", e.mode, e.path)?
                }
                chunk::index::EntryKind::Symlink { target } => {
                    writeln!(out, "{:>10} {:>10}  link  {} -> {target}", "-", "-", e.path)?
                }
            }
        }
        return Ok(());
    }
    let mut names = chunk::list_backups(store.as_ref(), args.tag.as_deref())?;
    if let Some(n) = args.limit {
        names.truncate(n);
    }
    if !args.long && !args.json {
        for n in names {
            writeln!(out, "{n}")?;
        }
        return Ok(());
    }
    let mut infos = Vec::new();
    for n in names {
        let name = n.to_string();
        let idx = chunk::read_index(store.as_ref(), &name)?;
        infos.push(BackupInfo::of(&name, &idx));
    }
    if args.json {
        return print_json(out, &infos);
    }
    for i in infos {
        writeln!(
            out,
            "{}  {} files  {} logical  {} on disk  {}",
            i.name,
            i.files,
            human_bytes(i.logical_bytes),
            human_bytes(i.disk_bytes),
            serde_json::Value::Object(i.meta)
        )?;
    }
    Ok(())
}

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
    #[arg(short = 't', long, default_value = "default")]
    tag: String,
    /// With `latest`: the newest backup whose metadata height is at most H
    #[arg(long, value_name = "H")]
    height: Option<u64>,
    /// Only restore paths matching this regular expression
    #[arg(long, value_parser = parse_regex)]
    filter: Option<Regex>,
    /// Remove local files that are not in the backup
    #[arg(long)]
    delete: bool,
    /// Chunk cache directory (read first, filled with what is fetched)
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Worker threads [default: twice the cores, 4 to 8]
    #[arg(long)]
    workers: Option<usize>,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
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

pub fn restore(args: RestoreArgs, out: &mut dyn Write) -> Result<()> {
    let (wanted, dir) = args.name_and_dir()?;
    let store = args.store.open_existing()?;
    let (name, idx) = if wanted == "latest" {
        chunk::latest_index(store.as_ref(), &args.tag, args.height)?.ok_or_else(|| {
            anyhow::anyhow!(
                "no backup with tag '{}'{} in {}",
                args.tag,
                args.height
                    .map_or(String::new(), |h| format!(" at height {h} or below")),
                store.describe()
            )
        })?
    } else {
        if args.height.is_some() {
            bail!("--height only applies to `latest`");
        }
        (wanted.clone(), chunk::read_index(store.as_ref(), &wanted)?)
    };
    let opts = RestoreOptions {
        filter: args.filter,
        delete: args.delete,
        cache: args.cache,
        workers: workers(args.workers)?,
        progress: Arc::default(),
    };
    let reporter = Reporter::start(format!("restoring {name}"), Arc::clone(&opts.progress));
    let result = chunk::restore::restore(store.as_ref(), &name, &idx, &dir, &opts);
    drop(reporter);
    let summary =
        result.with_context(|| format!("restore of {name} into {} failed", dir.display()))?;
    if args.json {
        return print_json(
            out,
            &serde_json::json!({ "name": name, "summary": summary }),
        );
    }
    writeln!(
        out,
        "restored {name}: {} files, {} scanned, {} chunks already right, {} fetched ({} downloaded), {} written, {} holes{}",
        summary.files,
        human_bytes(summary.bytes_scanned),
        summary.chunks_reused,
        summary.chunks_fetched,
        human_bytes(summary.bytes_downloaded),
        human_bytes(summary.bytes_written),
        summary.holes,
        if summary.deleted > 0 { format!(", {} removed", summary.deleted) } else { String::new() }
    )?;
    Ok(())
}

/// Arguments of `btm check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Also read, decompress and re-hash every referenced chunk
    #[arg(long)]
    read_data: bool,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

pub fn check(args: CheckArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open_existing()?;
    let report = chunk::check(store.as_ref(), args.read_data)?;
    if args.json {
        print_json(out, &report)?;
    } else {
        for p in &report.problems {
            writeln!(out, "problem: {p}")?;
        }
        writeln!(
            out,
            "{} indexes, {} chunks referenced{}; {} problems",
            report.indexes,
            report.chunks,
            if args.read_data {
                format!(", {} verified", report.chunks_verified)
            } else {
                String::new()
            },
            report.problems.len()
        )?;
    }
    if !report.problems.is_empty() {
        bail!(
            "check found {} problem(s) in {}",
            report.problems.len(),
            store.describe()
        );
    }
    Ok(())
}
