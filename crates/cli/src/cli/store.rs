//! What the engine's verbs share: which store (`-s`, `BTM_STORE`, its
//! keys and trust), how fast and with how many workers, and finding the
//! backup a command names.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use btm_daemon::chain::Chain;
use clap::Args;
use regex::bytes::Regex;

use btm_chunk::cache::Cache;
use btm_chunk::public::{Access, Mirrors, Publishing, SigningKey};
use btm_chunk::store::{Location, Open, Store};
use btm_chunk::{inventory, Repo};
use btm_daemon::settings::{ConfigError, DEFAULT_CONFIG};

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
    #[arg(long, value_name = "PUBKEY", global = true, env = "BTM_TRUST", value_delimiter = ',', value_parser = parse_public_key)]
    trust: Vec<btm_chunk::public::PublicKey>,
    /// Read an s3://, gs:// or az:// bucket anonymously, as a public
    /// snapshot (through its catalog)
    #[arg(long, global = true)]
    no_sign_request: bool,
    /// The publisher's signing key: keeps a published store's catalog
    /// right as backups are forgotten and garbage is collected
    #[arg(long, value_name = "FILE", global = true, env = "BTM_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    /// Sign the catalogs written valid for this long (e.g. `7d`): readers
    /// refuse one older, so a mirror frozen on an old copy is caught
    /// [default: as long as the catalog replaced allowed; none at first]
    // The brackets are clap's help text, not a rustdoc link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "DURATION", global = true, value_parser = humantime::parse_duration)]
    pub(super) expires: Option<std::time::Duration>,
    /// Refuse a published store's catalog published longer ago than this
    /// (e.g. `2d`)
    #[arg(long, value_name = "DURATION", global = true, value_parser = humantime::parse_duration)]
    max_age: Option<std::time::Duration>,
}

pub(super) fn parse_public_key(s: &str) -> Result<btm_chunk::public::PublicKey, String> {
    s.parse()
        .map_err(|e: btm_chunk::public::KeyError| e.to_string())
}

/// The places a store is read from, to report on after a restore.
pub(super) type Places = Arc<Mirrors>;

/// A store opened to change, with the signing key that keeps its catalog
/// right when it is published.
pub(super) struct Writable {
    store: Arc<dyn Store>,
    key: Option<SigningKey>,
    expires: Option<std::time::Duration>,
}

impl Writable {
    /// Run `f` on the store: through [`Publishing`] when a key was given,
    /// committing what it changed.
    pub(super) fn with<T>(&self, f: impl FnOnce(Arc<dyn Store>) -> Result<T>) -> Result<T> {
        match &self.key {
            Some(key) => {
                let publishing = Publishing::new(Arc::clone(&self.store), key);
                let publishing = Arc::new(publishing.with_expiry(self.expires));
                let out = f(Arc::clone(&publishing) as Arc<dyn Store>)?;
                publishing.commit()?;
                Ok(out)
            }
            None => f(Arc::clone(&self.store)),
        }
    }
}

impl StoreArgs {
    /// Open the store to write to it (created if it is a new directory).
    pub(super) fn open(&self) -> Result<Arc<dyn Store>> {
        let location = self.location()?.for_writing()?;
        Ok(btm_chunk::store::open(&location, Open::Write)?)
    }

    /// Open a store to read it (listing, restore, check, verify): a store
    /// of the operator's, or a published one (a web server, a public
    /// bucket, or any store with trusted keys), read through its catalog.
    /// Reading a published store with no trusted key warns that nothing
    /// read is authenticated.
    pub(super) fn open_reader(&self) -> Result<Arc<dyn Store>> {
        let location = self.location()?;
        let access = self.access(&location)?;
        let opened = btm_chunk::public::open(&location, &access)?;
        if opened.unauthenticated {
            warn_unauthenticated(&location);
        }
        Ok(opened.store)
    }

    /// [`StoreArgs::open_reader`] for a restore, which may read a
    /// published store from several places at once: `-s` and each of
    /// `mirrors`, and with `listed` the mirrors its catalog lists. The
    /// places, when the store is read through its catalog, to report on.
    pub(super) fn open_mirrored(
        &self,
        mirrors: &[String],
        listed: bool,
    ) -> Result<(Arc<dyn Store>, Option<Places>)> {
        let location = self.location()?;
        let access = self.access(&location)?;
        let public = location.is_web() || access.anonymous || !access.trust.is_empty();
        if mirrors.is_empty() && !public {
            return Ok((self.open_reader()?, None));
        }
        let mut places = vec![location.clone()];
        for m in mirrors {
            places.push(m.parse().with_context(|| format!("--mirror {m}"))?);
        }
        let opened = Arc::new(Mirrors::open(&places, &access, listed)?);
        if access.trust.is_empty() {
            warn_unauthenticated(&location);
        }
        Ok((Arc::clone(&opened) as Arc<dyn Store>, Some(opened)))
    }

    /// How to read `location`: the keys to trust, and where the newest
    /// catalogs accepted are remembered.
    fn access(&self, location: &Location) -> Result<Access> {
        // `--trust` reads any store through its catalog; the keys of the
        // configuration apply to published stores only, so the operator's
        // own unpublished store still reads as it is.
        let public = self.no_sign_request || location.is_web();
        let trust = match (self.trust.is_empty(), public) {
            (false, _) => self.trust.clone(),
            (true, true) => self.configured_trust()?,
            (true, false) => Vec::new(),
        };
        Ok(Access {
            anonymous: self.no_sign_request,
            trust,
            max_age: self.max_age,
            // The newest catalog accepted from each store, to refuse an
            // older copy later: beside the metadata cache.
            seen: self
                .cache
                .clone()
                .or_else(Cache::default_dir)
                .map(|c| c.join("catalogs")),
        })
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
        Ok(Writable {
            store,
            key,
            expires: self.expires,
        })
    }

    /// Open the operator's own store, which must exist, to change it (a
    /// published store read by URL or anonymously is read-only).
    pub(super) fn open_own(&self) -> Result<Arc<dyn Store>> {
        let location = self.location()?;
        if self.no_sign_request || location.is_web() {
            bail!("{location} is read-only to btm (a published snapshot); run this on the directory or bucket it is published from");
        }
        Ok(btm_chunk::store::open(&location, Open::Existing)?)
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

    /// Where restores keep their records of what they wrote (beside the
    /// metadata cache, per user).
    pub(super) fn records_dir(&self) -> Option<PathBuf> {
        self.cache
            .clone()
            .or_else(Cache::default_dir)
            .map(|c| c.join("restored"))
    }

    /// `store` with the cache and the connections these flags ask for.
    pub(super) fn repo(&self, store: &Arc<dyn Store>) -> Repo {
        let repo =
            Repo::new(Arc::clone(store)).with_connections(self.connections.map(|c| c as usize));
        match &self.cache {
            Some(dir) => repo.with_cache(Some(Cache::new(dir.clone()))),
            None => repo,
        }
    }

    /// The store: `-s`, else `$BTM_STORE`, else `[export] store` of
    /// /etc/btm/btm.toml. A configuration file that exists but cannot be
    /// read is an error, not "no store".
    /// Where the store is: `-s`, `$BTM_STORE`, else `[export] store` of
    /// the configuration, parsed once.
    fn location(&self) -> Result<Location> {
        Ok(self.url()?.parse()?)
    }

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

fn warn_unauthenticated(location: &Location) {
    eprintln!(
        "warning: {location} is not your store and no key is trusted: this snapshot is unauthenticated (give --trust PUBKEY, the publisher's key)"
    );
}

pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    btm_daemon::settings::parse_size(s)
}

pub(super) fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("a rate of 0 would never finish; leave --max-rate out for no limit".into()),
        n => Ok(n),
    }
}

pub(super) fn workers(n: Option<usize>) -> Result<usize> {
    match n {
        Some(0) => bail!("--workers must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(btm_chunk::default_workers()),
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
    find_backup_of(store, wanted, tag, height, None)
}

/// [`find_backup`], with `latest` only among the backups of `chain` (a
/// chain id or genesis hash their metadata records).
pub(super) fn find_backup_of(
    store: &dyn Store,
    wanted: &str,
    tag: &str,
    height: Option<u64>,
    chain: Option<&str>,
) -> Result<(String, btm_chunk::format::head::Decoded)> {
    if wanted == "latest" {
        let of_chain = |idx: &btm_chunk::format::head::Decoded| {
            chain.is_none_or(|c| Chain::of_meta(idx.meta()).is_some_and(|k| k.is(c)))
        };
        return inventory::latest_where(store, tag, height, of_chain)?.ok_or_else(|| {
            anyhow::anyhow!(
                "no backup with tag '{tag}'{}{} in {}",
                chain.map_or(String::new(), |c| format!(" of chain {c}")),
                height.map_or(String::new(), |h| format!(" at height {h} or below")),
                store.describe()
            )
        });
    }
    if height.is_some() || chain.is_some() {
        bail!("--height and --chain only apply to `latest`");
    }
    Ok((wanted.to_owned(), inventory::read_index(store, wanted)?))
}

/// A regular expression given on the command line (`--exclude`).
pub(super) fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| format!("bad regular expression: {e}"))
}

/// Record that `dir` now holds backup `name` of `chain` (unknown: a record
/// that says nothing, so an older one no longer speaks for it), for the
/// next restore into it. A failure is a warning: the restore is done.
pub(super) fn remember_chain(dir: &std::path::Path, name: &str, chain: Option<Chain>) {
    let Some(records) = btm_daemon::chain::records_dir() else {
        return;
    };
    if let Err(e) = btm_daemon::chain::record(&records, dir, name, &chain.unwrap_or_default()) {
        eprintln!(
            "warning: cannot record which chain {} holds in {}: {e}",
            dir.display(),
            records.display()
        );
    }
}
