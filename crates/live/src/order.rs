//! The order background hydration fetches files in: what a node reads
//! first when it starts comes first.
//!
//! A node opening its database reads its manifests and small files whole
//! (LevelDB's `CURRENT`, `MANIFEST-*`, `LOG`, config and genesis files,
//! RocksDB's `OPTIONS-*`), then the newest data (the newest SST files and
//! block files, the head of an append-only log). So: manifests first,
//! newest first; then small files; then everything else from the newest
//! to the oldest.
//!
//! Small files come in the backup's own order, not by age: that is the
//! order their chunks lie in the packs, so hydration reads them densely.
//! Newest first would jump across the packs (an accounts directory written
//! round-robin over 200 subdirectories puts consecutive files 200 entries
//! apart), and each read would bring mostly bytes nobody asked for. A node
//! reads such a directory whole anyway.
//!
//! Pure: it sees only what the backup recorded, one 16-byte key a file, so
//! that a tree of millions of files is ordered once, when the skeleton is
//! made, and the order kept on disk ([`crate::table`]).

use std::cmp::Reverse;

/// Files at most this size come first.
pub const SMALL: u64 = 1 << 20;

/// Whether a file is one a node reads whole at start, whatever its size.
pub fn is_manifest(path: &[u8]) -> bool {
    let name = path.rsplit(|&c| c == b'/').next().unwrap_or(path);
    const PREFIXES: [&[u8]; 4] = [b"MANIFEST", b"CURRENT", b"OPTIONS", b"IDENTITY"];
    const SUFFIXES: [&[u8]; 4] = [b".json", b".toml", b".yaml", b".conf"];
    PREFIXES.iter().any(|p| name.starts_with(p)) || SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The groups files are hydrated in, first to last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    /// Manifests, newest first.
    Manifest,
    /// Other files of at most [`SMALL`] bytes, in the backup's order.
    Small,
    /// Everything else, newest first.
    Large,
}

/// Where one file goes in the order: keys sort in hydration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    group: Group,
    /// Newest first (0 where age does not count).
    mtime: Reverse<i64>,
    /// The file's place in the live files' table, which follows the
    /// backup's walk order (by path): the order is total and the same on
    /// every run.
    pub slot: u32,
}

impl Key {
    /// The key of live file `slot` at `path`, with `bytes` of data and
    /// modification time `mtime_ns` in the backup.
    pub fn new(slot: u32, path: &[u8], bytes: u64, mtime_ns: i64) -> Key {
        let group = if is_manifest(path) {
            Group::Manifest
        } else if bytes <= SMALL {
            Group::Small
        } else {
            Group::Large
        };
        Key {
            group,
            mtime: Reverse(if group == Group::Small { 0 } else { mtime_ns }),
            slot,
        }
    }
}

/// Sort `keys` into hydration order: manifests, then small files, then
/// the rest; manifests and the rest newest first, and everything in the
/// backup's order otherwise.
pub fn hydration_order(keys: &mut [Key]) {
    keys.sort_unstable();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn manifests_and_small_files_first_then_newest() {
        let files: [(&[u8], u64, i64); 5] = [
            (b"db/000010.ldb", 8 << 20, 10),
            (b"db/000011.ldb", 8 << 20, 20),
            (b"db/MANIFEST-000004", 4 << 20, 1),
            (b"db/CURRENT", 16, 2),
            (b"cold.bin", 1 << 30, 1),
        ];
        let mut keys: Vec<Key> = files
            .iter()
            .enumerate()
            .map(|(i, (p, b, m))| Key::new(i as u32, p, *b, *m))
            .collect();
        hydration_order(&mut keys);
        let order: Vec<u32> = keys.iter().map(|k| k.slot).collect();
        assert_eq!(order, vec![3, 2, 1, 0, 4]);
    }

    #[test]
    fn small_files_come_in_the_backups_order_whatever_their_age() {
        let mut keys: Vec<Key> = (0..6u32)
            .map(|i| {
                Key::new(
                    i,
                    format!("accounts/{}/{i}", i % 3).as_bytes(),
                    200,
                    i64::from(i),
                )
            })
            .collect();
        keys.push(Key::new(6, b"db/CURRENT", 16, 0));
        hydration_order(&mut keys);
        let order: Vec<u32> = keys.iter().map(|k| k.slot).collect();
        assert_eq!(order, vec![6, 0, 1, 2, 3, 4, 5]);
    }

    proptest! {
        /// The order is a permutation; manifests, then small files, then
        /// the rest; manifests and large files newest first, small files
        /// in the backup's order.
        #[test]
        fn early_files_never_wait_for_late_ones(
            files in prop::collection::vec((prop::collection::vec(b'a'..=b'z', 1..8), 0u64..(4 << 20), any::<i64>()), 0..40)
        ) {
            let mut keys: Vec<Key> = files
                .iter()
                .enumerate()
                .map(|(i, (p, b, m))| Key::new(i as u32, p, *b, *m))
                .collect();
            hydration_order(&mut keys);
            let mut slots: Vec<u32> = keys.iter().map(|k| k.slot).collect();
            slots.sort_unstable();
            prop_assert_eq!(slots, (0..files.len() as u32).collect::<Vec<_>>());
            let group = |s: u32| {
                let (p, b, _) = &files[s as usize];
                if is_manifest(p) { 0 } else if *b <= SMALL { 1 } else { 2 }
            };
            for w in keys.windows(2) {
                let (a, b) = (w[0].slot, w[1].slot);
                prop_assert!(group(a) <= group(b));
                if group(a) == group(b) && group(a) == 1 {
                    prop_assert!(a < b);
                } else if group(a) == group(b) {
                    prop_assert!(files[a as usize].2 >= files[b as usize].2);
                }
            }
        }
    }
}
