//! The order background hydration fetches files in: what a node reads
//! first when it starts comes first.
//!
//! A node opening its database reads its small files whole (LevelDB's
//! `CURRENT`, `MANIFEST-*`, `LOG`, config and genesis files, RocksDB's
//! `OPTIONS-*`), then the newest data (the newest SST files and block
//! files, the head of an append-only log). So: small files and manifests
//! first, then everything else from the newest to the oldest. Pure: it
//! sees only what the backup recorded.

use std::cmp::Reverse;

/// Files at most this size come first.
pub const SMALL: u64 = 1 << 20;

/// What ordering needs to know of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Its path in the backup.
    pub path: &'a [u8],
    /// Bytes still to fetch.
    pub bytes: u64,
    /// Its modification time in the backup.
    pub mtime_ns: i64,
}

/// Whether a file is one a node reads whole at start, whatever its size.
pub fn is_manifest(path: &[u8]) -> bool {
    let name = path.rsplit(|&c| c == b'/').next().unwrap_or(path);
    const PREFIXES: [&[u8]; 4] = [b"MANIFEST", b"CURRENT", b"OPTIONS", b"IDENTITY"];
    const SUFFIXES: [&[u8]; 4] = [b".json", b".toml", b".yaml", b".conf"];
    PREFIXES.iter().any(|p| name.starts_with(p)) || SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The order to hydrate `files` in, as indexes into it: small files and
/// manifests first, then the rest; each group newest first, then by path
/// (so the order is total and the same on every run).
pub fn hydration_order(files: &[Candidate<'_>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| {
        let f = &files[i];
        let early = f.bytes <= SMALL || is_manifest(f.path);
        (!early, Reverse(f.mtime_ns), f.path)
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn manifests_and_small_files_first_then_newest() {
        let files = [
            Candidate {
                path: b"db/000010.ldb",
                bytes: 8 << 20,
                mtime_ns: 10,
            },
            Candidate {
                path: b"db/000011.ldb",
                bytes: 8 << 20,
                mtime_ns: 20,
            },
            Candidate {
                path: b"db/MANIFEST-000004",
                bytes: 4 << 20,
                mtime_ns: 1,
            },
            Candidate {
                path: b"db/CURRENT",
                bytes: 16,
                mtime_ns: 2,
            },
            Candidate {
                path: b"cold.bin",
                bytes: 1 << 30,
                mtime_ns: 1,
            },
        ];
        let order = hydration_order(&files);
        assert_eq!(order, vec![3, 2, 1, 0, 4]);
    }

    proptest! {
        /// The order is a permutation, and no late file comes before an
        /// early one.
        #[test]
        fn early_files_never_wait_for_late_ones(
            files in prop::collection::vec((prop::collection::vec(b'a'..=b'z', 1..8), 0u64..(4 << 20), any::<i64>()), 0..40)
        ) {
            let cands: Vec<Candidate<'_>> = files
                .iter()
                .map(|(p, b, m)| Candidate { path: p, bytes: *b, mtime_ns: *m })
                .collect();
            let order = hydration_order(&cands);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..cands.len()).collect::<Vec<_>>());
            let early = |i: usize| cands[i].bytes <= SMALL || is_manifest(cands[i].path);
            let first_late = order.iter().position(|&i| !early(i)).unwrap_or(order.len());
            prop_assert!(order[first_late..].iter().all(|&i| !early(i)));
        }
    }
}
