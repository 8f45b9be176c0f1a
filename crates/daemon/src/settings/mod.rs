//! The daemon's configuration: `/etc/btm/btm.toml` overlaid by flags.
//!
//! Every `btm daemon` flag has a key of the same name here (`--rpc-url` is
//! `rpc_url`). Unknown keys, wrong types and bad values are errors that name
//! the key, on one line, so a typo never silently changes what the daemon
//! does; SIGHUP relies on this to refuse a broken file and keep the old one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::export::ExportSettings;
use crate::height::NodeRpc;
use crate::height::SourceSpec;
use btm::dirs::Dirs;
use btm::retention::Algo;
use btm::volume::{self, SnapMode};

mod source;
mod values;

use source::{resolve_auth, resolve_source, Rpc};
pub use values::*;

/// Where the daemon looks for its file when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/btm/btm.toml";

/// Errors in the daemon's configuration. Each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        cause: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a wrong type.
    #[error("config {path} line {line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A key has an unusable value.
    #[error("invalid {key}: {message}")]
    Invalid {
        /// The key (flag names use the same words).
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A required key is missing.
    #[error("{key} is required{hint}")]
    Missing {
        /// The key.
        key: &'static str,
        /// How to give it.
        hint: &'static str,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Declares an options struct and its `overlay` from one list of fields,
/// so a key is declared once: its doc, its file key (serde), its flag
/// (clap) and how it overlays all come from the field.
macro_rules! options {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name { $( $(#[$fmeta])* pub $field: $ty, )* }

        impl $name {
            /// `self` with every key set in `top` replaced by `top`'s value
            /// (tables key by key).
            pub fn overlay(self, top: $name) -> $name {
                $name { $( $field: Overlay::overlay(self.$field, top.$field), )* }
            }
        }
    };
}

/// How a key of `top` replaces the same key of a base.
trait Overlay {
    fn overlay(self, top: Self) -> Self;
}

/// A value replaced whole (everything but `[export]`, which overlays key
/// by key).
trait Leaf {}

impl<T: Leaf> Overlay for Option<T> {
    fn overlay(self, top: Self) -> Self {
        top.or(self)
    }
}

impl Overlay for Option<ExportOptions> {
    fn overlay(self, top: Self) -> Self {
        match (self, top) {
            (Some(b), Some(t)) => Some(b.overlay(t)),
            (b, t) => t.or(b),
        }
    }
}

macro_rules! leaves {
    ($($t:ty),*) => { $(impl Leaf for $t {})* };
}
leaves!(
    String,
    u64,
    usize,
    bool,
    PathBuf,
    Duration,
    SnapMode,
    Algo,
    Vec<String>,
    Argv,
    HookOptions
);

/// Snapshot hooks: commands run around each snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookOptions {
    /// Run before each snapshot; a failure skips that snapshot.
    pub pre_snapshot: Option<Vec<String>>,
    /// Run after each snapshot; a failure is logged.
    pub post_snapshot: Option<Vec<String>>,
    /// How long a hook may run before it is killed (default 30s).
    #[serde(default, deserialize_with = "de_duration")]
    pub timeout: Option<Duration>,
}

options! {
    /// Periodic export of snapshots (`[export]`): each field is a key of
    /// the table and, through its `#[arg]`, the `--export-…` flag of the
    /// same name.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields)]
    pub struct ExportOptions {
        /// Export store: a path, file://…, s3://…, gs://… or az://…
        #[arg(long = "export-store", id = "export_store", value_name = "STORE")]
        pub store: Option<String>,
        /// Export at each new multiple of this many blocks [default: 100 × itv]
        #[arg(long = "export-every", id = "export_every", value_name = "BLOCKS",
              value_parser = clap::value_parser!(u64).range(1..))]
        pub every: Option<u64>,
        /// Backup tag [default: the host name]
        #[arg(long = "export-tag", id = "export_tag", value_name = "TAG")]
        pub tag: Option<String>,
        /// Backups of the tag kept after each export [default: 7]
        #[arg(long = "export-keep", id = "export_keep", value_name = "N",
              value_parser = clap::value_parser!(u64).range(1..))]
        pub keep: Option<u64>,
        /// Local chunk cache directory
        #[arg(long = "export-cache", id = "export_cache", value_name = "DIR")]
        pub cache: Option<PathBuf>,
        /// Worker threads [default: by cores]
        #[arg(long = "export-concurrency", id = "export_concurrency", value_name = "N")]
        pub concurrency: Option<usize>,
        /// Store requests in flight [default: by store, see docs/performance.md]
        #[arg(long = "export-connections", id = "export_connections", value_name = "N")]
        pub connections: Option<usize>,
        /// Pack size, e.g. 16MiB [default: 16 MiB]
        #[arg(long = "export-pack-size", id = "export_pack_size", value_name = "SIZE",
              value_parser = parse_size)]
        #[serde(default, deserialize_with = "de_pack_size")]
        pub pack_size: Option<u64>,
        /// Most bytes read per second, e.g. 50MiB
        #[arg(long = "export-max-rate", id = "export_max_rate", value_name = "SIZE",
              value_parser = parse_size)]
        #[serde(default, deserialize_with = "de_max_rate")]
        pub max_rate: Option<u64>,
        /// Append-only file (block log), relative to the volume root; repeatable
        #[arg(long = "export-append-only", id = "export_append_only", value_name = "RELPATH")]
        pub append_only: Option<Vec<String>>,
        /// Glob left out of exports besides validator key material; repeatable
        #[arg(long = "export-exclude", id = "export_exclude", value_name = "GLOB")]
        pub exclude: Option<Vec<String>>,
        /// Export validator key material too [default: false]
        #[arg(long = "export-include-secrets", id = "export_include_secrets",
              value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
        pub include_secrets: Option<bool>,
        /// Run garbage collection after each export [default: true]
        #[arg(long = "export-gc", id = "export_gc", value_name = "BOOL",
              num_args = 0..=1, default_missing_value = "true")]
        pub gc: Option<bool>,
        /// Grace period of garbage collection, e.g. 24h [default: 24h]
        #[arg(long = "export-gc-grace", id = "export_gc_grace", value_name = "DURATION",
              value_parser = parse_duration)]
        #[serde(default, deserialize_with = "de_duration")]
        pub gc_grace: Option<Duration>,
        /// Publish the store after each export: keep its signed catalog so
        /// anyone can restore from a web server or public bucket
        /// (docs/publishing.md) [default: false]
        #[arg(long = "export-publish", id = "export_publish", value_name = "BOOL",
              num_args = 0..=1, default_missing_value = "true")]
        pub publish: Option<bool>,
        /// The key publishing signs with (`btm key generate FILE`)
        #[arg(long = "export-signing-key", id = "export_signing_key", value_name = "FILE")]
        pub signing_key: Option<PathBuf>,
        /// Sign each published catalog valid for this long, e.g. 7d: readers
        /// refuse it once expired, so a frozen mirror is caught
        /// [default: no expiry]
        #[arg(long = "export-publish-expires", id = "export_publish_expires",
              value_name = "DURATION", value_parser = parse_duration)]
        #[serde(default, deserialize_with = "de_duration")]
        pub publish_expires: Option<Duration>,
        /// Publisher keys whose signed snapshots `btm restore` and the other
        /// readers accept (ed25519:…); repeatable
        #[arg(long = "export-trust", id = "export_trust", value_name = "PUBKEY")]
        pub trust: Option<Vec<String>>,
    }
}

impl ExportOptions {
    /// Fill in defaults and check every value; `itv` is the snapshot
    /// interval, which `every` must be a multiple of.
    pub fn resolve(self, itv: u64) -> Result<ExportSettings, ConfigError> {
        let store = self
            .store
            .filter(|s| !s.is_empty())
            .ok_or(ConfigError::Missing {
                key: "export.store",
                hint: " when [export] is configured (--export-store)",
            })?;
        let store = store
            .parse::<btm_chunk::store::Location>()
            .and_then(btm_chunk::store::Location::for_writing)
            .map_err(|e| invalid("export.store", e.to_string()))?;
        let every = self.every.unwrap_or(itv.saturating_mul(100));
        if every == 0 || every % itv != 0 {
            return Err(invalid(
                "export.every",
                format!("{every} must be a positive multiple of itv ({itv})"),
            ));
        }
        let tag = self.tag.unwrap_or_else(btm::host::name);
        btm_chunk::format::head::validate_tag(&tag)
            .map_err(|e| invalid("export.tag", e.to_string()))?;
        let keep = self.keep.unwrap_or(crate::export::DEFAULT_KEEP);
        if keep == 0 {
            return Err(invalid("export.keep", "must be at least 1"));
        }
        let concurrency = self.concurrency.unwrap_or_else(btm_chunk::default_workers);
        if !(1..=64).contains(&concurrency) {
            return Err(invalid("export.concurrency", "must be between 1 and 64"));
        }
        let append_only = self.append_only.unwrap_or_default();
        for p in &append_only {
            btm_chunk::format::tree::check_path(p.as_bytes())
                .map_err(|e| invalid("export.append_only", format!("'{p}': {e}")))?;
        }
        let exclude = self.exclude.unwrap_or_default();
        for g in &exclude {
            if g.trim_matches('/').is_empty() {
                return Err(invalid(
                    "export.exclude",
                    format!("'{g}' is an empty pattern"),
                ));
            }
        }
        check_transfer(self.connections, self.pack_size)?;
        for k in self.trust.iter().flatten() {
            k.parse::<btm_chunk::public::PublicKey>()
                .map_err(|e| invalid("export.trust", e.to_string()))?;
        }
        let publish = resolve_publish(self.publish.unwrap_or(false), self.signing_key)?;
        if self.publish_expires.is_some() && publish.is_none() {
            return Err(invalid(
                "export.publish_expires",
                "needs publish = true (it signs the published catalog)",
            ));
        }
        Ok(ExportSettings {
            store,
            every,
            publish,
            publish_expires: self.publish_expires,
            tag,
            keep,
            cache: self.cache,
            concurrency,
            connections: self.connections,
            pack_size: self.pack_size.map(|p| p as usize),
            max_rate: self.max_rate,
            append_only,
            exclude,
            include_secrets: self.include_secrets.unwrap_or(false),
            gc: self.gc.unwrap_or(true),
            gc_grace: self.gc_grace.unwrap_or(btm_chunk::gc::DEFAULT_GRACE),
            chain: None,
        })
    }
}

/// `export.connections` and `export.pack_size`, within their bounds.
fn check_transfer(connections: Option<usize>, pack_size: Option<u64>) -> Result<(), ConfigError> {
    if connections.is_some_and(|c| !(1..=256).contains(&c)) {
        return Err(invalid("export.connections", "must be between 1 and 256"));
    }
    let chunk = btm_chunk::backup::DEFAULT_CHUNK_SIZE;
    if pack_size.is_some_and(|p| !(chunk..=1 << 30).contains(&p)) {
        return Err(invalid(
            "export.pack_size",
            format!("must be between {chunk} bytes (the chunk size) and 1 GiB"),
        ));
    }
    Ok(())
}

/// `export.publish` needs a signing key that loads: checked now, so a
/// daemon never fails its first publishing export on a bad key.
fn resolve_publish(
    publish: bool,
    signing_key: Option<PathBuf>,
) -> Result<Option<PathBuf>, ConfigError> {
    Ok(match (publish, signing_key) {
        (false, _) => None,
        (true, None) => {
            return Err(ConfigError::Missing {
                key: "export.signing_key",
                hint: " when export.publish is true (make one with `btm key generate FILE`)",
            })
        }
        (true, Some(path)) => {
            btm_chunk::public::SigningKey::load(&path)
                .map_err(|e| invalid("export.signing_key", e.to_string()))?;
            Some(path)
        }
    })
}

options! {
    /// Everything the daemon can be told, all optional. Each field is
    /// declared once: it is the file key of its name and, through its
    /// `#[arg]`, the `btm daemon` flag of the same name; the flags are
    /// overlaid on the file with [`DaemonOptions::overlay`], then
    /// [`DaemonOptions::resolve`] checks every value. Keys without a flag
    /// are tables or lists best written in the file.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields)]
    pub struct DaemonOptions {
        /// The volume (ZFS dataset or btrfs subvolume path)
        #[arg(short = 'p', long, env = "BTM_VOLUME", value_parser = parse_volume)]
        pub volume: Option<String>,
        /// zfs or btrfs, case-insensitive [default: detected]
        #[arg(short = 'm', long, value_parser = parse_mode)]
        #[serde(default, deserialize_with = "de_mode")]
        pub mode: Option<SnapMode>,
        /// Snapshot interval in blocks [default: 10]
        #[arg(short = 'i', long, value_parser = clap::value_parser!(u64).range(1..))]
        pub itv: Option<u64>,
        /// Most snapshots kept [default: 100]
        #[arg(short = 'c', long, value_parser = clap::value_parser!(u64).range(1..))]
        pub cap: Option<u64>,
        /// fair or fade, case-insensitive [default: fair]
        #[arg(short = 'a', long, value_parser = parse_algo)]
        #[serde(default, deserialize_with = "de_algo")]
        pub algo: Option<Algo>,
        /// push, file, command, or a node RPC: cometbft, ethereum,
        /// bitcoin, substrate, solana or beacon [default: push]
        #[arg(long, value_name = "SOURCE")]
        pub source: Option<String>,
        /// Node RPC URL (http://…) for an RPC source; with another source
        /// and --rpc-kind, asked for exports' chain identity and flushes
        #[arg(long, value_name = "URL")]
        pub rpc_url: Option<String>,
        /// The dialect of --rpc-url when the source is push, file or
        /// command: cometbft, ethereum, bitcoin, substrate, solana or beacon
        #[arg(long, value_name = "KIND")]
        pub rpc_kind: Option<String>,
        /// The node's RPC cookie file (Bitcoin Core's `.cookie`), read at
        /// each request
        #[arg(long, value_name = "PATH")]
        pub rpc_cookie: Option<PathBuf>,
        /// The node's RPC user (with rpc_password in the file)
        #[arg(long, value_name = "USER")]
        pub rpc_user: Option<String>,
        /// The node's RPC password: configuration file only, never a flag
        /// (other users can read a command line)
        #[arg(skip)]
        pub rpc_password: Option<String>,
        /// Force the node to write its state before each snapshot, where
        /// its dialect can (bitcoin), bounded by the hook timeout
        /// [default: true]
        #[arg(long, value_name = "BOOL")]
        pub flush: Option<bool>,
        /// File holding the height, for source file
        #[arg(long, value_name = "PATH")]
        pub height_file: Option<PathBuf>,
        /// Command printing the height, for source command (split on
        /// spaces; the file takes an argument vector)
        #[arg(long, value_name = "CMD", value_parser = parse_argv)]
        pub height_command: Option<Argv>,
        /// Time between polls, e.g. 1s, 500ms [default: 1s]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        #[serde(default, deserialize_with = "de_duration")]
        pub poll_interval: Option<Duration>,
        /// Timeout of one height read (HTTP request or command) [default: 5s]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        #[serde(default, deserialize_with = "de_duration")]
        pub source_timeout: Option<Duration>,
        /// How long a snapshot waits for the volume lock [default: 60s]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        #[serde(default, deserialize_with = "de_duration")]
        pub lock_timeout: Option<Duration>,
        /// How long one zfs or btrfs command may run before it is killed
        /// and the volume reported stalled [default: 2m]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        #[serde(default, deserialize_with = "de_duration")]
        pub command_timeout: Option<Duration>,
        /// Most blocks a height may be ahead of the newest snapshot; 0 for
        /// no limit
        #[arg(long, value_name = "BLOCKS")]
        pub max_height_jump: Option<u64>,
        /// Control socket [default: /run/btm/btm.sock]
        #[arg(long, value_name = "PATH")]
        pub socket: Option<PathBuf>,
        /// Group owning the control socket (root owns it)
        #[arg(long, value_name = "GROUP")]
        pub socket_group: Option<String>,
        /// Control socket permissions, octal [default: 0660]
        #[arg(long, value_name = "MODE")]
        pub socket_mode: Option<String>,
        /// Log filter (the global --log-level sets it)
        #[arg(skip)]
        pub log_level: Option<String>,
        /// Prometheus endpoint address, e.g. 127.0.0.1:9375
        #[arg(long, value_name = "ADDR")]
        pub metrics_listen: Option<String>,
        /// Snapshot hooks (`[hooks]`).
        #[arg(skip)]
        pub hooks: Option<HookOptions>,
        /// Periodic export (`[export]`), or the `--export-…` flags.
        #[command(flatten)]
        pub export: Option<ExportOptions>,
        /// Files `btm rollback` carries across besides the validator
        /// signing state it finds by itself (relative to the volume root).
        #[arg(skip)]
        pub preserve: Option<Vec<String>>,
        /// How long a branch kept by a rollback lives before the daemon
        /// and `btm prune` drop it, e.g. 7d; 0 drops it at once (but never
        /// the only way back within an hour of its rollback) [default: 7d]
        #[arg(long, value_name = "DURATION", value_parser = parse_keep)]
        #[serde(default, deserialize_with = "de_keep")]
        pub keep_branches: Option<Duration>,
    }
}

impl DaemonOptions {
    /// Parse a TOML document; `path` is only used in error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                message: e.message().replace('\n', " ").trim().to_owned(),
            }
        })
    }

    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        Self::from_toml(&text, path)
    }

    /// Fill in defaults and check every value.
    pub fn resolve(self) -> Result<DaemonSettings, ConfigError> {
        let volume = self.volume.ok_or(ConfigError::Missing {
            key: "volume",
            hint: " (-p, $BTM_VOLUME, or `volume` in the config file)",
        })?;
        volume::validate_name(&volume).map_err(|e| invalid("volume", e.to_string()))?;
        for p in self.preserve.iter().flatten() {
            p.parse::<btm::preserve::RelPath>()
                .map_err(|e| invalid("preserve", e.to_string()))?;
        }
        let itv = self.itv.unwrap_or(btm::config::DEFAULT_ITV);
        if itv == 0 {
            return Err(invalid("itv", "must be at least 1"));
        }
        let cap = self.cap.unwrap_or(btm::config::DEFAULT_CAP);
        if cap == 0 {
            return Err(invalid("cap", "must be at least 1"));
        }
        let source_timeout = self.source_timeout.unwrap_or(Duration::from_secs(5));
        let auth = resolve_auth(self.rpc_cookie, self.rpc_user, self.rpc_password)?;
        let (source, node) = resolve_source(
            self.source.as_deref().unwrap_or("push"),
            Rpc {
                url: self.rpc_url,
                kind: self.rpc_kind.as_deref(),
                auth,
                timeout: source_timeout,
            },
            self.height_file,
            self.height_command.map(|a| a.0),
        )?;
        let flush = resolve_flush(self.flush, node.as_ref())?;
        let socket_mode = resolve_socket_mode(self.socket_mode.as_deref())?;
        check_socket_group(self.socket_group.as_deref())?;
        let metrics_listen = resolve_metrics_listen(self.metrics_listen.as_deref())?;
        if let Some(level) = &self.log_level {
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| invalid("log_level", format!("'{level}': {e}")))?;
        }
        let hooks = self.hooks.unwrap_or_default();
        check_hooks(&hooks)?;
        let export = match self.export {
            Some(e) => Some(ExportSettings {
                chain: node.clone(),
                ..e.resolve(itv)?
            }),
            None => None,
        };
        Ok(DaemonSettings {
            export,
            dirs: Dirs::from_env(),
            volume,
            mode: self.mode,
            itv,
            cap,
            algo: self.algo.unwrap_or(Algo::Fair),
            source,
            node,
            flush,
            poll_interval: self.poll_interval.unwrap_or(Duration::from_secs(1)),
            source_timeout,
            lock_timeout: self.lock_timeout.unwrap_or(Duration::from_secs(60)),
            keep_branches: self.keep_branches.unwrap_or(DEFAULT_KEEP_BRANCHES),
            command_timeout: self
                .command_timeout
                .unwrap_or(btm::volume::cmd::DEFAULT_LIMIT),
            max_height_jump: self
                .max_height_jump
                .unwrap_or(crate::DEFAULT_MAX_HEIGHT_JUMP),
            socket: self.socket.unwrap_or_else(btm::client::default_socket),
            socket_group: self.socket_group,
            socket_mode,
            log_level: self.log_level,
            metrics_listen,
            pre_snapshot: hooks.pre_snapshot,
            post_snapshot: hooks.post_snapshot,
            hook_timeout: hooks.timeout.unwrap_or(Duration::from_secs(30)),
        })
    }
}

/// `flush`: on by default where the node's dialect can write its state;
/// asked for where it cannot, an error.
fn resolve_flush(flush: Option<bool>, node: Option<&NodeRpc>) -> Result<bool, ConfigError> {
    match (flush, node) {
        (Some(true), Some(n)) if !n.can_flush() => Err(invalid(
            "flush",
            format!(
                "the {} dialect has no call that writes the node's state; see docs/nodes.md",
                n.dialect.name()
            ),
        )),
        (Some(true), None) => Err(invalid(
            "flush",
            "needs a node RPC (an RPC source, or rpc_url with rpc_kind)",
        )),
        (f, Some(n)) => Ok(f.unwrap_or(true) && n.can_flush()),
        (_, None) => Ok(false),
    }
}

/// Hooks, when given, name a command.
fn check_hooks(hooks: &HookOptions) -> Result<(), ConfigError> {
    for (key, argv) in [
        ("hooks.pre_snapshot", &hooks.pre_snapshot),
        ("hooks.post_snapshot", &hooks.post_snapshot),
    ] {
        if argv
            .as_ref()
            .is_some_and(|a| a.first().is_none_or(|p| p.is_empty()))
        {
            return Err(invalid(key, "the command is empty"));
        }
    }
    Ok(())
}

/// `socket_mode`: octal permission bits, 0660 by default.
fn resolve_socket_mode(mode: Option<&str>) -> Result<u32, ConfigError> {
    match mode {
        None => Ok(0o660),
        Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "socket_mode",
                    format!("'{s}' is not an octal mode like 0660"),
                )
            }),
    }
}

/// `socket_group`: a plausible group name (whether it exists is checked
/// when the socket is created).
fn check_socket_group(group: Option<&str>) -> Result<(), ConfigError> {
    match group {
        Some(g) if g.is_empty() || g.contains(|c: char| c.is_whitespace() || c == ':') => Err(
            invalid("socket_group", format!("'{g}' is not a group name")),
        ),
        _ => Ok(()),
    }
}

/// `metrics_listen`: an address and port.
fn resolve_metrics_listen(addr: Option<&str>) -> Result<Option<SocketAddr>, ConfigError> {
    addr.map(|a| {
        a.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "metrics_listen",
                format!("'{a}' is not an address like 127.0.0.1:9375"),
            )
        })
    })
    .transpose()
}

/// The daemon's resolved, validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSettings {
    /// The volume.
    pub volume: String,
    /// Its mode, or `None` to detect.
    pub mode: Option<SnapMode>,
    /// Snapshot interval in blocks.
    pub itv: u64,
    /// Retention cap.
    pub cap: u64,
    /// Retention rule.
    pub algo: Algo,
    /// Where heights come from.
    pub source: SourceSpec,
    /// The node's RPC, when there is one: asked for exports' chain
    /// identity, and to write its state before snapshots.
    pub node: Option<NodeRpc>,
    /// Whether to force the node to write its state before each snapshot
    /// (its dialect can, and `flush` is not false).
    pub flush: bool,
    /// Time between polls (polled sources).
    pub poll_interval: Duration,
    /// Timeout of one height read.
    pub source_timeout: Duration,
    /// How long a snapshot waits for the volume lock.
    pub lock_timeout: Duration,
    /// How long one `zfs` or `btrfs` command may run.
    pub command_timeout: Duration,
    /// Most blocks a height may be ahead of the newest snapshot; 0 for no
    /// limit (see [`crate::check_height`]).
    pub max_height_jump: u64,
    /// The control socket.
    pub socket: PathBuf,
    /// Group owning the socket.
    pub socket_group: Option<String>,
    /// Socket permission bits.
    pub socket_mode: u32,
    /// Log filter.
    pub log_level: Option<String>,
    /// Prometheus endpoint address.
    pub metrics_listen: Option<SocketAddr>,
    /// Pre-snapshot hook.
    pub pre_snapshot: Option<Vec<String>>,
    /// Post-snapshot hook.
    pub post_snapshot: Option<Vec<String>>,
    /// Hook timeout.
    pub hook_timeout: Duration,
    /// How long a rollback's branch is kept.
    pub keep_branches: Duration,
    /// Periodic export, when configured.
    pub export: Option<ExportSettings>,
    /// Where locks, pins and height windows live: `$BTM_RUNTIME_DIR` and
    /// `$BTM_STATE_DIR` (not configuration keys: the CLI and the daemon
    /// must agree on them).
    pub dirs: Dirs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::height::Auth;
    use btm::family::Dialect;

    fn parse(text: &str) -> Result<DaemonSettings, ConfigError> {
        DaemonOptions::from_toml(text, Path::new("t.toml"))?.resolve()
    }

    #[test]
    fn minimal_file_gets_the_seed_defaults() {
        let s = parse("volume = \"tank/data\"\n").expect("valid");
        assert_eq!((s.itv, s.cap, s.algo), (10, 100, Algo::Fair));
        assert_eq!(s.source, SourceSpec::Push);
        assert_eq!(s.poll_interval, Duration::from_secs(1));
        assert_eq!(s.socket_mode, 0o660);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("volume = \"a\"\nitvv = 5\n", "itvv"),
            ("volume = \"a\"\nitv = \"ten\"\n", "line 2"),
            ("volume = \"a\"\nmode = \"ext4\"\n", "ext4"),
            ("volume = \"a\"\nalgo = \"lifo\"\n", "lifo"),
            ("volume = \"a\"\nitv = 0\n", "itv"),
            ("volume = \"a\"\ncap = 0\n", "cap"),
            ("volume = \"a b\"\n", "volume"),
            ("itv = 5\n", "volume is required"),
            (
                "volume = \"a\"\nsource = \"ethereum\"\n",
                "rpc_url is required",
            ),
            (
                "volume = \"a\"\nsource = \"ethereum\"\nrpc_url = \"https://x\"\n",
                "https",
            ),
            ("volume = \"a\"\nsource = \"carrier-pigeon\"\n", "source"),
            ("volume = \"a\"\nrpc_url = \"http://x\"\n", "rpc_kind is required"),
            (
                "volume = \"a\"\nrpc_url = \"http://x\"\nrpc_kind = \"tron\"\n",
                "tron",
            ),
            ("volume = \"a\"\nrpc_kind = \"ethereum\"\n", "rpc_url is required"),
            (
                "volume = \"a\"\nsource = \"ethereum\"\nrpc_url = \"http://x\"\nrpc_kind = \"cometbft\"\n",
                "rpc_kind",
            ),
            ("volume = \"a\"\npoll_interval = \"soon\"\n", "soon"),
            ("volume = \"a\"\npoll_interval = \"0s\"\n", "zero"),
            ("volume = \"a\"\nsocket_mode = \"999\"\n", "socket_mode"),
            (
                "volume = \"a\"\nsource = \"command\"\nheight_command = []\n",
                "height_command",
            ),
            ("volume = \"a\"\n[hooks]\npre = [\"x\"]\n", "pre"),
            (
                "volume = \"a\"\nmetrics_listen = \"localhost\"\n",
                "metrics_listen",
            ),
            (
                "volume = \"a\"\n[export]\nevery = 100\n",
                "export.store is required",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"ftp://x\"\n",
                "export.store",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"s3://\"\n",
                "export.store",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\nevery = 15\n",
                "export.every",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\nkeep = 0\n",
                "export.keep",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\nexclude = [\"/\"]\n",
                "export.exclude",
            ),
            ("volume = \"a\"\npreserve = [\"../x\"]\n", "preserve"),
            ("volume = \"a\"\nkeep_branches = \"a week\"\n", "keep_branches"),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\ntag = \"a/b\"\n",
                "export.tag",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\nmax_rate = \"fast\"\n",
                "fast",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\nmax_rate = 0\n",
                "max_rate",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\nconcurrency = 0\n",
                "export.concurrency",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\nappend_only = [\"../x\"]\n",
                "export.append_only",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\ngc_grace = \"0s\"\n",
                "zero",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\nstor = 1\n",
                "stor",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\npublish = true\n",
                "export.signing_key is required",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\npublish = true\nsigning_key = \"/nonexistent/key\"\n",
                "export.signing_key",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\ntrust = [\"ed25519:nope\"]\n",
                "export.trust",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\npublish_expires = \"7d\"\n",
                "export.publish_expires",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"/b\"\npublish_expires = \"soon\"\n",
                "line 4: 'soon' is not a duration",
            ),
            (
                "volume = \"a\"\n[export]\nstore = \"https://snapshots.example/x\"\n",
                "read-only",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(needle), "{text:?} gave {e:?}");
            assert!(!e.contains('\n'), "multi-line error: {e:?}");
        }
    }

    #[test]
    fn exports_ask_the_height_rpc_or_rpc_url_for_the_chain_identity() {
        let chain = |text: &str| {
            parse(&format!("volume = \"a\"\n{text}[export]\nstore = \"/b\"\n"))
                .expect("valid")
                .export
                .expect("export configured")
                .chain
                .map(|c| (c.dialect, c.url))
        };
        assert_eq!(chain(""), None);
        assert_eq!(
            chain("source = \"cometbft\"\nrpc_url = \"http://n:26657\"\n"),
            Some((Dialect::Cometbft, "http://n:26657".into()))
        );
        // Push mode: the heights are pushed, the identity is asked.
        assert_eq!(
            chain("rpc_url = \"http://n:8545\"\nrpc_kind = \"ethereum\"\n"),
            Some((Dialect::Ethereum, "http://n:8545".into()))
        );
    }

    #[test]
    fn every_dialect_is_a_source_with_credentials_and_a_flush_where_it_has_one() {
        for d in Dialect::ALL {
            let s = parse(&format!(
                "volume = \"a\"\nsource = \"{}\"\nrpc_url = \"http://n:1\"\n",
                d.name()
            ))
            .expect("valid");
            assert_eq!(s.source.name(), d.name());
            assert_eq!(s.node.as_ref().map(|n| n.dialect), Some(d));
            // Only Bitcoin Core has a call that writes its state.
            assert_eq!(s.flush, d == Dialect::Bitcoin, "{}", d.name());
        }
        let btc = "volume = \"a\"\nsource = \"bitcoin\"\nrpc_url = \"http://n:8332\"\n";
        let s = parse(&format!(
            "{btc}rpc_cookie = \"/var/lib/bitcoind/.cookie\"\n"
        ))
        .expect("valid");
        assert_eq!(
            s.node.expect("node").auth,
            Auth::Cookie("/var/lib/bitcoind/.cookie".into())
        );
        let s = parse(&format!(
            "{btc}rpc_user = \"u\"\nrpc_password = \"p\"\nflush = false\n"
        ))
        .expect("valid");
        assert!(!s.flush);
        assert!(matches!(
            s.node.expect("node").auth,
            Auth::UserPassword { .. }
        ));
        // Beside a push source, rpc_kind names the dialect that flushes.
        let s = parse("volume = \"a\"\nrpc_url = \"http://n:8332\"\nrpc_kind = \"bitcoin\"\nrpc_cookie = \"/c\"\n")
            .expect("valid");
        assert!(s.flush && s.source == SourceSpec::Push);
        for (text, key) in [
            (
                format!("{btc}rpc_cookie = \"/c\"\nrpc_user = \"u\"\n"),
                "rpc_cookie",
            ),
            (format!("{btc}rpc_user = \"u\"\n"), "rpc_password"),
            (format!("{btc}rpc_password = \"p\"\n"), "rpc_user"),
            (
                format!("{btc}rpc_user = \"a:b\"\nrpc_password = \"p\"\n"),
                "rpc_user",
            ),
            (
                "volume = \"a\"\nrpc_cookie = \"/c\"\n".to_owned(),
                "rpc_cookie",
            ),
            ("volume = \"a\"\nsource = \"geth\"\n".to_owned(), "source"),
            (
                "volume = \"a\"\nsource = \"solana\"\nrpc_url = \"http://n:1\"\nflush = true\n"
                    .to_owned(),
                "flush",
            ),
            ("volume = \"a\"\nflush = true\n".to_owned(), "flush"),
            (format!("{btc}rpc_kind = \"ethereum\"\n"), "rpc_kind"),
        ] {
            let e = parse(&text).expect_err(&text).to_string();
            assert!(e.contains(key), "{text:?} gave {e:?}");
            assert!(!e.contains('\n'), "multi-line error: {e:?}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let file = DaemonOptions::from_toml(
            "volume = \"tank/a\"\nitv = 5\nalgo = \"fade\"\n",
            Path::new("t.toml"),
        )
        .expect("valid");
        let flags = DaemonOptions {
            itv: Some(20),
            ..DaemonOptions::default()
        };
        let s = file.overlay(flags).resolve().expect("valid");
        assert_eq!(
            (s.volume.as_str(), s.itv, s.algo),
            ("tank/a", 20, Algo::Fade)
        );
    }

    #[test]
    fn the_node_recipes_are_valid() {
        let doc = std::fs::read_to_string(
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("docs/nodes.md"),
        )
        .expect("docs/nodes.md");
        let mut sources = std::collections::BTreeSet::new();
        for block in doc.split("```toml\n").skip(1) {
            let text = block.split("```").next().expect("a closed block");
            let s = DaemonOptions::from_toml(text, Path::new("docs/nodes.md"))
                .and_then(DaemonOptions::resolve)
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            sources.insert(s.source.name());
        }
        // One recipe per dialect at least, and the command fallback.
        for d in Dialect::ALL {
            assert!(sources.contains(d.name()), "no recipe for {}", d.name());
        }
        assert!(sources.contains("command"));
    }

    #[test]
    fn the_example_config_is_valid() {
        let path =
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("btm.toml.example");
        let s = DaemonOptions::load(&path)
            .expect("example parses")
            .resolve()
            .expect("example valid");
        assert_eq!(s.volume, "tank/chain");
        assert_eq!(s.keep_branches, DEFAULT_KEEP_BRANCHES);
        assert_eq!(
            parse("volume = \"a\"\nkeep_branches = \"0\"\n")
                .expect("valid")
                .keep_branches,
            Duration::ZERO
        );
        let e = s.export.expect("the example exports");
        assert_eq!((e.every, e.keep, e.max_rate), (1000, 7, Some(100 << 20)));
        assert!(e.gc);
    }

    #[test]
    fn export_flags_override_the_file_key_by_key() {
        let file = DaemonOptions::from_toml(
            "volume = \"a\"\nitv = 10\n[export]\nstore = \"/b\"\nkeep = 3\nmax_rate = 1000\n",
            Path::new("t.toml"),
        )
        .expect("valid");
        let flags = DaemonOptions {
            export: Some(ExportOptions {
                every: Some(50),
                ..ExportOptions::default()
            }),
            ..DaemonOptions::default()
        };
        let e = file
            .overlay(flags)
            .resolve()
            .expect("valid")
            .export
            .expect("export");
        assert_eq!(
            (e.store.to_string().as_str(), e.every, e.keep, e.max_rate),
            ("/b", 50, 3, Some(1000))
        );
        let none = parse("volume = \"a\"\n").expect("valid");
        assert!(none.export.is_none());
        assert_eq!(parse_size("50MiB"), Ok(50 << 20));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
    }
}
