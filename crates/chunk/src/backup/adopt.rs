//! Adopting the packs of a dead writer: a killed export resumes without
//! uploading again what it had uploaded.

use crate::format::packidx::{self, PackEntry};
use crate::lease::Lease;
use crate::store::{Id, Kind, Store};
use crate::{with_retry, ChunkError, Repo};

/// Index the packs a dead writer uploaded but never indexed, so that this
/// backup reuses them instead of uploading their chunks again: a killed
/// export resumes. A writer is dead when its lease expired, or when it is
/// proven gone ([`crate::lease::holder`]). Each pack is checked
/// (footer and trailer) before a pack index names it; adopting the pack of
/// a writer that is in fact alive only lists its chunks twice, which the
/// format allows. Failures only cost re-uploads, so they are logged.
pub(super) fn adopt_orphans(repo: &Repo, lease: &Lease<'_>) {
    let (store, cache, connections) = (repo.store(), repo.cache(), repo.metadata_connections());
    let dead = crate::lease::dead_holders(store, &lease.others_listed(), lease.store_now());
    let mut adopted = Vec::new();
    let mut done_leases = Vec::new();
    for (name, info) in dead {
        let found = crate::pipeline::pool::map(&info.pending, connections, |id| {
            read_trailer(store, id).ok()
        });
        let all = found.iter().all(Option::is_some);
        adopted.extend(found.into_iter().flatten());
        if all {
            done_leases.push(name);
        }
    }
    if adopted.is_empty() {
        return;
    }
    let ids: Vec<Id> = adopted.iter().map(|p| p.id).collect();
    let result = packidx::encode(&adopted)
        .map_err(ChunkError::from)
        .and_then(|data| {
            let data = crate::store::Bytes::from(data);
            let id = Id::of(&data);
            with_retry(store, || store.put(Kind::PackIndex, &id, data.clone()))
                .map_err(|e| ChunkError::store("indexing packs of an interrupted backup", e))?;
            if let Some(c) = cache {
                c.put(Kind::PackIndex, &id, &data);
            }
            Ok(())
        });
    match result {
        Ok(()) => {
            tracing::info!(
                packs = ids.len(),
                "reusing packs uploaded by an interrupted backup"
            );
            for name in done_leases {
                let _ = with_retry(store, || store.delete_marker(&name));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not index the packs of an interrupted backup; uploading again")
        }
    }
}

/// A pack's size and contents from its footer and trailer (two ranged
/// reads, not the whole pack).
fn read_trailer(store: &dyn Store, id: &Id) -> Result<PackEntry, ChunkError> {
    use crate::format::pack::{parse_footer, parse_trailer, FOOTER_LEN};
    let what = format!("pack {id}");
    let len = with_retry(store, || store.size(Kind::Pack, id))?;
    let foot_at = len
        .checked_sub(FOOTER_LEN as u64)
        .ok_or_else(|| ChunkError::Invalid(format!("{what} is too short")))?;
    let footer = with_retry(store, || {
        store.get_range(Kind::Pack, id, foot_at, FOOTER_LEN as u64)
    })?;
    let (tlen, count) = parse_footer(&footer, &what)?;
    let frames = foot_at
        .checked_sub(u64::from(tlen))
        .ok_or_else(|| ChunkError::Invalid(format!("{what}: trailer longer than the pack")))?;
    let trailer = with_retry(store, || {
        store.get_range(Kind::Pack, id, frames, u64::from(tlen))
    })?;
    let blobs = parse_trailer(&trailer, count, frames, &what)?;
    Ok(PackEntry {
        id: *id,
        len,
        blobs,
    })
}
