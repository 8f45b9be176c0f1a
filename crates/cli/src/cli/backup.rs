//! `btm backup`: a directory into a chunk store, sparse and incremental.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use regex::bytes::Regex;

use btm_chunk::backup::{BackupOptions, DEFAULT_CHUNK_SIZE};
use btm_chunk::public::Publishing;
use btm_chunk::store::Store;

use super::progress::Reporter;
use super::store::{parse_rate, parse_regex, parse_size, workers, StoreArgs};
use super::{human_bytes, print_json};

fn parse_meta(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("metadata must be a JSON object, like '{\"height\":120}'".into()),
        Err(e) => Err(format!("metadata is not JSON: {e}")),
    }
}

/// A chain id given by hand: printable, no spaces, at most 100 bytes.
fn parse_chain(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 100 && s.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(s.to_owned())
    } else {
        Err("a chain id is 1 to 100 printable characters without spaces, like cosmoshub-4".into())
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
    #[arg(short = 't', long, env = "BTM_TAG", default_value = "default")]
    tag: String,
    /// Metadata, a JSON object stored in the index (e.g. '{"height":120}')
    #[arg(short = 'm', long = "meta", value_name = "JSON", value_parser = parse_meta)]
    meta: Option<serde_json::Map<String, serde_json::Value>>,
    /// The chain the directory holds (its chain id, e.g. `cosmoshub-4`),
    /// recorded as `chain_id` in the metadata: a restore then never lays
    /// it over a node of another chain, and `latest --chain` finds it
    #[arg(long, value_name = "ID", env = "BTM_CHAIN", value_parser = parse_chain)]
    chain: Option<String>,
    /// The height of the chain the directory holds, recorded as `height`
    /// in the metadata (`restore latest --height` finds it)
    #[arg(long, value_name = "H", env = "BTM_HEIGHT")]
    height: Option<u64>,
    /// Ask this node RPC (http://…) which block it has at --height, and
    /// record it as the backup's chain identity: `btm verify` then proves a
    /// node restored from it, and a restore never lays it over another
    /// chain
    #[arg(long, value_name = "URL", env = "BTM_RPC_URL", requires_all = ["height", "rpc_kind"])]
    rpc_url: Option<String>,
    /// The RPC's dialect: cometbft, ethereum, bitcoin, substrate, solana or
    /// beacon
    #[arg(long, value_name = "KIND", env = "BTM_RPC_KIND", requires = "rpc_url", value_parser = super::rpc::parse_dialect)]
    rpc_kind: Option<btm::family::Dialect>,
    #[command(flatten)]
    rpc: super::rpc::RpcAuthArgs,
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

/// The engine's options `args` ask for.
fn options(args: &BackupArgs) -> Result<BackupOptions> {
    let mut opts = BackupOptions::new(&args.tag, btm_daemon::node_policy());
    opts.meta = args.meta.clone().unwrap_or_default();
    if let Some(id) = args.chain.clone() {
        if opts
            .meta
            .get("chain_id")
            .is_some_and(|v| v.as_str() != Some(&id))
        {
            bail!("--chain {id} and the chain_id in --meta disagree; give one");
        }
        opts.meta.insert("chain_id".into(), id.into());
    }
    if let Some(h) = args.height {
        if opts
            .meta
            .get("height")
            .is_some_and(|v| v.as_u64() != Some(h))
        {
            bail!("--height {h} and the height in --meta disagree; give one");
        }
        opts.meta.insert("height".into(), h.into());
    }
    if let (Some(url), Some(kind), Some(h)) = (&args.rpc_url, args.rpc_kind, args.height) {
        let identity = args.rpc.node(kind, url)?.identity(h).with_context(|| {
            format!(
                "the {} RPC at {url} did not say which block it has at {h}",
                kind.name()
            )
        })?;
        opts.meta
            .insert("chain".into(), serde_json::to_value(identity)?);
    }
    opts.filter = args.filter.clone();
    opts.append_only = args.append_only.clone();
    opts.exclude = args
        .exclude
        .iter()
        .map(|g| (g.clone(), "--exclude".to_owned()))
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
    Ok(opts)
}

pub fn backup(args: BackupArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open()?;
    let opts = options(&args)?;
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
    let counted = Arc::new(btm_chunk::store::Counting::new(Arc::clone(&store)));
    let publishing = key
        .as_ref()
        .map(|k| Publishing::new(Arc::clone(&counted) as Arc<dyn Store>, k))
        .map(|p| Arc::new(p.with_expiry(args.store.expires)));
    let target: Arc<dyn Store> = match &publishing {
        Some(p) => Arc::clone(p) as Arc<dyn Store>,
        None => Arc::clone(&store),
    };
    let result = args.store.repo(&target).backup(&args.dir, &opts);
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
