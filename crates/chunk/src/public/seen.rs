//! What a reader remembers of the catalogs it accepted: the newest
//! `published` time per store and signing key, so that a mirror or cache
//! serving an older copy later is caught (`docs/format.md`, "Freshness").
//! One small file per store and key under the reader's cache, replaced
//! atomically.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::key::PublicKey;

#[derive(Serialize, Deserialize)]
struct Seen {
    store: String,
    key: String,
    published: DateTime<Utc>,
}

/// The file that remembers `store` signed by `key`, under `dir`.
fn file(dir: &Path, store: &str, key: &PublicKey) -> PathBuf {
    let id = blake3::hash(format!("{store}\n{key}").as_bytes()).to_hex();
    dir.join(format!("{}.json", &id[..32]))
}

/// The newest catalog time accepted from `store` signed by `key`, if any.
pub(super) fn newest(dir: &Path, store: &str, key: &PublicKey) -> Option<DateTime<Utc>> {
    let data = std::fs::read(file(dir, store, key)).ok()?;
    let seen: Seen = serde_json::from_slice(&data).ok()?;
    (seen.store == store && seen.key == key.to_string()).then_some(seen.published)
}

/// Remember that a catalog of `store` signed by `key` and published at
/// `published` was accepted.
pub(super) fn remember(
    dir: &Path,
    store: &str,
    key: &PublicKey,
    published: DateTime<Utc>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let seen = Seen {
        store: store.to_owned(),
        key: key.to_string(),
        published,
    };
    let path = file(dir, store, key);
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec(&seen).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}
