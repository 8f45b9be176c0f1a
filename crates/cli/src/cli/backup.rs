//! `btm backup`, `btm backups`, `btm restore`, `btm check` and
//! `btm forget`: the sparse chunk engine from the command line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use regex::bytes::Regex;

use btm_chunk::backup::{BackupOptions, DEFAULT_CHUNK_SIZE};
use btm_chunk::cache::Cache;
use btm_chunk::format::tree::{EntryKind, Item};
use btm_chunk::public::{Access, Publishing, SigningKey};
use btm_chunk::restore::RestoreOptions;
use btm_chunk::store::Store;
use btm_chunk::{inventory, BackupInfo, Repo};
use btm_daemon::height::identity::ChainIdentity;
use btm_daemon::settings::{ConfigError, DEFAULT_CONFIG};

use super::progress::Reporter;
use super::{human_bytes, print_json};

/// Which store to use.
#[derive(Debug, Args)]
pub(super) struct StoreArgs {
    /// Store: a path, file://…, s3://bucket/prefix, gs://bucket/prefix or
    /// az://container/prefix [default: $BTM_STORE, else [export] store of
    /// /etc/btm/btm.toml]
    // The brackets are clap's help text, not a rustdoc link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(
        short = 's',
        long,
        env = "BTM_STORE",
        value_name = "STORE",
        global = true
    )]
    store: Option<String>,
    /// Store requests in flight [default: 2 to 4 for a local store, 4 to 16
    /// for a bucket; see docs/performance.md]
    #[arg(long, value_name = "N", global = true, value_parser = clap::value_parser!(u64).range(1..=256))]
    connections: Option<u64>,
    /// Local cache of store metadata (pack indexes, tree segments)
    /// [default: $BTM_CACHE_DIR, /var/cache/btm as root, else ~/.cache/btm]
    #[arg(long, value_name = "DIR", global = true)]
    cache: Option<PathBuf>,
    /// Accept only snapshots this publisher key signed (ed25519:…, as `btm
    /// key generate` prints), read through the store's catalog; repeatable
    /// [default for stores read by URL or anonymously: [export] trust of
    /// /etc/btm/btm.toml]
    // The brackets are clap's help text, not a rustdoc link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "PUBKEY", global = true, value_parser = parse_public_key)]
    trust: Vec<btm_chunk::public::PublicKey>,
    /// Read an s3://, gs:// or az:// bucket anonymously, as a public
    /// snapshot (through its catalog)
    #[arg(long, global = true)]
    no_sign_request: bool,
    /// The publisher's signing key: keeps a published store's catalog
    /// right as backups are forgotten and garbage is collected
    #[arg(long, value_name = "FILE", global = true, env = "BTM_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
}

fn parse_public_key(s: &str) -> Result<btm_chunk::public::PublicKey, String> {
    s.parse()
        .map_err(|e: btm_chunk::public::KeyError| e.to_string())
}

/// A store opened to change, with the signing key that keeps its catalog
/// right when it is published.
pub(super) struct Writable {
    store: Box<dyn Store>,
    key: Option<SigningKey>,
}

impl Writable {
    /// Run `f` on the store: through [`Publishing`] when a key was given,
    /// committing what it changed.
    pub(super) fn with<T>(&self, f: impl FnOnce(&dyn Store) -> Result<T>) -> Result<T> {
        match &self.key {
            Some(key) => {
                let publishing = Publishing::new(self.store.as_ref(), key);
                let out = f(&publishing)?;
                publishing.commit()?;
                Ok(out)
            }
            None => f(self.store.as_ref()),
        }
    }
}

impl StoreArgs {
    /// Open the store to write to it (created if it is a new directory).
    pub(super) fn open(&self) -> Result<Box<dyn Store>> {
        Ok(btm_chunk::store::open(&self.url()?)?)
    }

    /// Open a store to read it (listing, restore, check, verify): a store
    /// of the operator's, or a published one (a web server, a public
    /// bucket, or any store with trusted keys), read through its catalog.
    /// Reading a published store with no trusted key warns that nothing
    /// read is authenticated.
    pub(super) fn open_reader(&self) -> Result<Box<dyn Store>> {
        let url = self.url()?;
        // `--trust` reads any store through its catalog; the keys of the
        // configuration apply to published stores only, so the operator's
        // own unpublished store still reads as it is.
        let public = self.no_sign_request || btm_chunk::store::is_web(&url);
        let trust = match (self.trust.is_empty(), public) {
            (false, _) => self.trust.clone(),
            (true, true) => self.configured_trust()?,
            (true, false) => Vec::new(),
        };
        let access = Access {
            anonymous: self.no_sign_request,
            trust,
        };
        let opened = btm_chunk::public::open(&url, &access)?;
        if opened.unauthenticated {
            eprintln!(
                "warning: {url} is not your store and no key is trusted: this snapshot is unauthenticated (give --trust PUBKEY, the publisher's key)"
            );
        }
        Ok(opened.store)
    }

    /// Open a store that must already exist, to delete from it (forget,
    /// gc). A published store needs the signing key, so that its catalog
    /// never names what is deleted.
    pub(super) fn open_writable(&self) -> Result<Writable> {
        let store = self.open_own()?;
        let url = store.describe();
        let key = match &self.signing_key {
            Some(path) => Some(SigningKey::load(path)?),
            None => None,
        };
        if key.is_none() && btm_chunk::public::writer::is_published(store.as_ref())? {
            bail!("{url} is published (it has a catalog): give --signing-key FILE so the catalog stays right as backups are forgotten and garbage is collected");
        }
        Ok(Writable { store, key })
    }

    /// Open the operator's own store, which must exist, to change it (a
    /// published store read by URL or anonymously is read-only).
    pub(super) fn open_own(&self) -> Result<Box<dyn Store>> {
        let url = self.url()?;
        if self.no_sign_request || btm_chunk::store::is_web(&url) {
            bail!("{url} is read-only to btm (a published snapshot); run this on the directory or bucket it is published from");
        }
        Ok(btm_chunk::store::open_existing(&url)?)
    }

    /// The keys `[export] trust` of the configuration names.
    fn configured_trust(&self) -> Result<Vec<btm_chunk::public::PublicKey>> {
        let keys = match super::daemon::load_file(None) {
            Ok(f) => f.export.and_then(|e| e.trust).unwrap_or_default(),
            // A broken configuration is reported by whatever needs it; the
            // reader then trusts nothing and says so.
            Err(_) => Vec::new(),
        };
        keys.iter()
            .map(|k| {
                k.parse()
                    .with_context(|| format!("[export] trust in {DEFAULT_CONFIG}"))
            })
            .collect()
    }

    /// The signing key, required.
    pub(super) fn signing_key(&self) -> Result<SigningKey> {
        let path = self.signing_key.as_ref().context(
            "publishing needs --signing-key FILE (make one with `btm key generate FILE`)",
        )?;
        Ok(SigningKey::load(path)?)
    }

    /// `store` with the cache and the connections these flags ask for.
    pub(super) fn repo<'s>(&self, store: &'s dyn Store) -> Repo<'s> {
        let repo = Repo::new(store).with_connections(self.connections.map(|c| c as usize));
        match &self.cache {
            Some(dir) => repo.with_cache(Some(Cache::new(dir.clone()))),
            None => repo,
        }
    }

    /// The store: `-s`, else `$BTM_STORE`, else `[export] store` of
    /// /etc/btm/btm.toml. A configuration file that exists but cannot be
    /// read is an error, not "no store".
    fn url(&self) -> Result<String> {
        if let Some(url) = &self.store {
            return Ok(url.clone());
        }
        let file = match super::daemon::load_file(None) {
            Ok(f) => f,
            Err(e @ (ConfigError::Read { .. } | ConfigError::Parse { .. })) => {
                return Err(e).context("no store given (-s, $BTM_STORE), and the configuration that could name one is broken")
            }
            Err(e) => return Err(e.into()),
        };
        file.export.and_then(|e| e.store).with_context(|| {
            format!("no store given: use -s STORE, set $BTM_STORE, or set [export] store in {DEFAULT_CONFIG}")
        })
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
    btm_daemon::settings::parse_size(s)
}

fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("a rate of 0 would never finish; leave --max-rate out for no limit".into()),
        n => Ok(n),
    }
}

fn workers(n: Option<usize>) -> Result<usize> {
    match n {
        Some(0) => bail!("--workers must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(btm_chunk::default_workers()),
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
    /// Leave out paths matching this glob (`*.log` at any depth,
    /// `data/tmp/**` from the root); repeatable. Validator keys are left out
    /// without it (docs/validators.md)
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Back up validator key material too (priv_validator_key.json,
    /// node_key.json, keyrings, keystores): it leaves the machine
    #[arg(long)]
    include_secrets: bool,
    /// Chunk size, e.g. 1MiB
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
    /// Pack size, e.g. 16MiB
    #[arg(long, value_parser = parse_size)]
    pack_size: Option<u64>,
    /// Read every file, even those unchanged since the previous backup
    #[arg(long)]
    force_read: bool,
    /// Read at most SIZE a second from disk (e.g. 50M), so that a backup of
    /// a running node never starves it [default: no limit]
    #[arg(long, value_name = "SIZE", value_parser = parse_rate)]
    max_rate: Option<u64>,
    /// Worker threads [default: twice the cores, 4 to 8]
    #[arg(long)]
    workers: Option<usize>,
    /// zstd level
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    level: i32,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
    /// Publish the store as the backup is written, as the daemon's
    /// `[export] publish` does: its signed catalog gains the new backup
    /// (needs --signing-key)
    #[arg(long)]
    publish: bool,
}

pub fn backup(args: BackupArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open()?;
    let mut opts = BackupOptions::new(&args.tag, btm_daemon::node_policy());
    opts.meta = args.meta.unwrap_or_default();
    opts.filter = args.filter;
    opts.append_only = args.append_only;
    opts.exclude = args
        .exclude
        .into_iter()
        .map(|g| (g, "--exclude".to_owned()))
        .collect();
    opts.include_secrets = args.include_secrets;
    opts.chunk_size = args.chunk_size;
    if let Some(p) = args.pack_size {
        opts.pack_size = usize::try_from(p).unwrap_or(usize::MAX);
    }
    opts.force_read = args.force_read;
    opts.max_rate = args.max_rate;
    opts.workers = workers(args.workers)?;
    opts.zstd_level = args.level;
    let reporter = Reporter::start(
        format!("backing up {}", args.dir.display()),
        Arc::clone(&opts.progress),
    );
    let key = if args.publish {
        Some(args.store.signing_key()?)
    } else {
        None
    };
    // Counted, so the report says what publishing added.
    let counted = btm_chunk::store::Counting::new(store.as_ref());
    let publishing = key.as_ref().map(|k| Publishing::new(&counted, k));
    let target: &dyn Store = match &publishing {
        Some(p) => p,
        None => store.as_ref(),
    };
    let result = args.store.repo(target).backup(&args.dir, &opts);
    drop(reporter);
    let summary = result.with_context(|| {
        format!(
            "backup of {} failed; no backup was written",
            args.dir.display()
        )
    })?;
    let published = match &publishing {
        Some(p) => {
            let (before, started) = (counted.requests(), std::time::Instant::now());
            p.commit().with_context(|| {
                format!(
                    "backup {} is written, but publishing it failed; `btm publish` retries",
                    summary.name
                )
            })?;
            Some(Published {
                requests: counted.requests() - before,
                ms: started.elapsed().as_millis() as u64,
            })
        }
        None => None,
    };
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        if let (Some(m), Some(p)) = (v.as_object_mut(), &published) {
            m.insert("published".into(), serde_json::to_value(p)?);
        }
        return print_json(out, &v);
    }
    writeln!(out, "{}", summary.name)?;
    print_summary(&summary);
    if let Some(p) = published {
        eprintln!(
            "published: the catalog names it ({} requests, {} ms)",
            p.requests, p.ms
        );
    }
    Ok(())
}

/// What publishing added to a backup.
#[derive(serde::Serialize)]
struct Published {
    /// Store requests.
    requests: u64,
    /// Milliseconds.
    ms: u64,
}

/// The one-line human summary of a backup, on stderr.
pub(super) fn print_summary(summary: &btm_chunk::backup::BackupSummary) {
    eprintln!(
        "{} files ({} unchanged{}), {} scanned, {} read, {} uploaded in {} new chunks and {} packs; {} chunks reused, {} empty",
        summary.files,
        summary.files_unchanged,
        if summary.files_changed > 0 {
            format!(", {} re-read because they changed while read", summary.files_changed)
        } else {
            String::new()
        },
        human_bytes(summary.bytes_scanned),
        human_bytes(summary.bytes_read),
        human_bytes(summary.bytes_uploaded),
        summary.chunks_uploaded,
        summary.packs_uploaded,
        summary.chunks_reused,
        summary.chunks_empty
    );
    for x in summary.excluded.iter().filter(|x| x.matched > 0) {
        eprintln!("excluded: {} ({}; {} matched)", x.pattern, x.why, x.matched);
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
    let store = args.store.open_reader()?;
    if let Some(BackupsCommand::Show { name, json }) = &args.show {
        return show(store.as_ref(), &args.store, name, *json, out);
    }
    let mut names = inventory::list_backups(store.as_ref(), args.tag.as_deref())?;
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
        match inventory::read_index(store.as_ref(), &name) {
            Ok(idx) => infos.push(BackupInfo::of(&name, &idx)),
            // One unreadable index is shown as such; the others still are.
            Err(e @ btm_chunk::ChunkError::Index(_)) => infos.push(BackupInfo::unreadable(&n, &e)),
            Err(e) => return Err(e.into()),
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

/// `btm backups show NAME`: the backup's entries, streamed.
fn show(
    store: &dyn Store,
    args: &StoreArgs,
    name: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let idx = inventory::read_index(store, name)?;
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
    }
}

/// The backup `wanted` names: itself, or with `latest` the newest with
/// `tag` (whose metadata height is at most `height`).
pub(super) fn find_backup(
    store: &dyn Store,
    wanted: &str,
    tag: &str,
    height: Option<u64>,
) -> Result<(String, btm_chunk::format::head::Decoded)> {
    if wanted == "latest" {
        return inventory::latest(store, tag, height)?.ok_or_else(|| {
            anyhow::anyhow!(
                "no backup with tag '{tag}'{} in {}",
                height.map_or(String::new(), |h| format!(" at height {h} or below")),
                store.describe()
            )
        });
    }
    if height.is_some() {
        bail!("--height only applies to `latest`");
    }
    Ok((wanted.to_owned(), inventory::read_index(store, wanted)?))
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
    /// Overwrite local validator signing state (data/priv_validator_state.json,
    /// slashing-protection databases) with the backup's copy, which may be
    /// older: a validator restarted on it can double-sign
    #[arg(long)]
    overwrite_signing_state: bool,
    /// Worker threads [default: twice the cores, 4 to 8]
    #[arg(long)]
    workers: Option<usize>,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
    /// Serve the backup at DIR at once (a FUSE mount), fetching what is
    /// read on demand and the rest in the background; DIR must be empty.
    /// `btm live finish DIR` ends it (docs/live-restore.md)
    #[arg(long, conflicts_with_all = ["filter", "delete", "overwrite_signing_state", "json"])]
    live: bool,
    /// With --live: how long a read waits for the store before it fails
    /// with an I/O error
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration, requires = "live")]
    read_timeout: std::time::Duration,
    /// With --live: never use FUSE passthrough, even where the kernel has it
    #[arg(long, requires = "live")]
    no_passthrough: bool,
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
    if args.live {
        return super::live::restore_live(super::live::LiveRestore {
            wanted,
            dir,
            store: &args.store,
            tag: &args.tag,
            height: args.height,
            read_timeout: args.read_timeout,
            passthrough: !args.no_passthrough,
        });
    }
    let store = args.store.open_reader()?;
    let (name, idx) = find_backup(store.as_ref(), &wanted, &args.tag, args.height)?;
    let opts = RestoreOptions {
        filter: args.filter,
        delete: args.delete,
        workers: workers(args.workers)?,
        overwrite_signing_state: args.overwrite_signing_state,
        ..RestoreOptions::new(btm_daemon::node_policy())
    };
    let reporter = Reporter::start(format!("restoring {name}"), Arc::clone(&opts.progress));
    let repo = args.store.repo(store.as_ref());
    let result = repo.restore(&name, &idx, &dir, &opts);
    drop(reporter);
    let summary = match result {
        // Refused before anything was changed: running it again cannot help.
        Err(e @ btm_chunk::ChunkError::Unrestorable { .. }) => return Err(e.into()),
        r => r.with_context(|| {
            format!(
                "restore of {name} into {} failed; run it again to finish it",
                dir.display()
            )
        })?,
    };
    if args.json {
        return print_json(
            out,
            &serde_json::json!({ "name": name, "summary": summary }),
        );
    }
    writeln!(
        out,
        "restored {name}: {} files{}, {} scanned, {} chunks already right, {} fetched in {} requests ({} downloaded), {} written, {} holes{}",
        summary.files,
        if summary.files_trusted > 0 {
            format!(" ({} completed by an earlier run)", summary.files_trusted)
        } else {
            String::new()
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

/// Arguments of `btm check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Also read every pack, and decompress and re-hash every chunk
    #[arg(long)]
    read_data: bool,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

pub fn check(args: CheckArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open_reader()?;
    let report = args.store.repo(store.as_ref()).check(args.read_data)?;
    if args.json {
        print_json(out, &report)?;
    } else {
        for p in &report.problems {
            writeln!(out, "problem: {p}")?;
        }
        writeln!(
            out,
            "{} indexes, {} chunks referenced in {} packs{}; {} problems",
            report.indexes,
            report.chunks,
            report.packs,
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

/// Arguments of `btm forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The backup to forget (its index is deleted; its data goes at the
    /// next `btm gc`)
    name: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Say what would be deleted; delete nothing
    #[arg(long)]
    dry_run: bool,
}

pub fn forget(args: ForgetArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open_writable()?;
    store.with(|s| Ok(args.store.repo(s).forget(&args.name, args.dry_run)?))?;
    if args.dry_run {
        writeln!(out, "would forget {}", args.name)?;
    } else {
        writeln!(out, "forgot {}; `btm gc` frees its data", args.name)?;
    }
    Ok(())
}
