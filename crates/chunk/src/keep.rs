//! Backup retention: keep the newest `keep` backups of a tag, delete the
//! rest. Deleting an index only makes its chunks unreferenced; the garbage
//! collector ([`super::gc`]) removes them later, safely.

use super::format::head::IndexName;
use super::inventory::list_backups;
use super::with_retry;
use super::ChunkError;
use crate::store::Store;

/// Of `names` (any order), those with exactly `tag` beyond the newest
/// `keep`, newest first. Other tags are never touched.
pub fn plan_keep(names: &[IndexName], tag: &str, keep: u64) -> Vec<IndexName> {
    let mut mine: Vec<&IndexName> = names.iter().filter(|n| n.tag == tag).collect();
    mine.sort_by(|a, b| b.cmp(a));
    mine.into_iter()
        .skip(usize::try_from(keep).unwrap_or(usize::MAX))
        .cloned()
        .collect()
}

/// Delete the backups of `tag` beyond the newest `keep`; returns their
/// names. With `dry_run`, only returns them.
pub fn prune_backups(
    store: &dyn Store,
    tag: &str,
    keep: u64,
    dry_run: bool,
) -> Result<Vec<String>, ChunkError> {
    let names = list_backups(store, Some(tag))?;
    let doomed: Vec<String> = plan_keep(&names, tag, keep)
        .iter()
        .map(ToString::to_string)
        .collect();
    if !dry_run {
        for name in &doomed {
            with_retry(store, || store.delete_index(name))?;
        }
    }
    Ok(doomed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The newest `keep` of the tag survive, everything else of the tag
        /// goes, and other tags (including prefixes and suffixes of it)
        /// are untouched.
        #[test]
        fn keeps_the_newest_of_exactly_the_tag(
            stamps in prop::collection::hash_set((0u32..1_000_000, 0usize..3), 0..40),
            keep in 0u64..10,
        ) {
            let tags = ["node", "node-b", "a-node"];
            let names: Vec<IndexName> = stamps.iter().map(|(t, k)| {
                let at = chrono::DateTime::from_timestamp(1_700_000_000 + i64::from(*t), 0).expect("time");
                IndexName::new(at, tags[*k])
            }).collect();
            let doomed = plan_keep(&names, "node", keep);
            let mut mine: Vec<&IndexName> = names.iter().filter(|n| n.tag == "node").collect();
            mine.sort_by(|a, b| b.cmp(a));
            prop_assert!(doomed.iter().all(|d| d.tag == "node"));
            for (rank, n) in mine.iter().enumerate() {
                prop_assert_eq!(doomed.contains(n), rank as u64 >= keep);
            }
        }
    }
}
