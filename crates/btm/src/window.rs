//! What is known about each snapshot's height beyond its label.
//!
//! - **Windows.** A polling daemon cannot know the exact height on disk at
//!   the instant of a snapshot: it names the snapshot by the height read
//!   just before and records the height read just after, so the snapshot
//!   holds a state somewhere in `[height, after]`. (Push mode gives exact
//!   heights.)
//! - **Durable heights.** A node that writes its state lazily (Bitcoin
//!   Core) restarts from a snapshot at its last write, not at the tip. When
//!   the daemon forces the write before a snapshot, the node says which
//!   height the write made durable, and that is recorded: the height the
//!   snapshot really restarts the node at.
//!
//! Both live in one small JSON file per volume under the state directory,
//! pruned to the snapshots that still exist whenever written. The file's
//! older form, `{"height": after}`, is still read.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::dirs::Dirs;

/// What is recorded about one snapshot's height.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The height read just after the snapshot (polled sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// The height the node's durable state held, when the node said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<u64>,
}

/// A record as stored: the older files hold a bare `after`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    After(u64),
    Record(Record),
}

/// Every record for `volume`; empty when none were recorded or the file is
/// unreadable.
pub fn records(dirs: &Dirs, volume: &str) -> BTreeMap<u64, Record> {
    let stored: BTreeMap<u64, Stored> = std::fs::read(dirs.window_file(volume))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    stored
        .into_iter()
        .map(|(h, s)| {
            let r = match s {
                Stored::After(after) => Record {
                    after: Some(after),
                    durable: None,
                },
                Stored::Record(r) => r,
            };
            (h, r)
        })
        .collect()
}

/// The recorded `height → height_after` pairs for `volume`.
pub fn load(dirs: &Dirs, volume: &str) -> BTreeMap<u64, u64> {
    records(dirs, volume)
        .into_iter()
        .filter_map(|(h, r)| Some((h, r.after?)))
        .collect()
}

/// Record that the snapshot at `height` was followed by `after`, keeping
/// only entries for `existing` heights. Written atomically.
pub fn record(
    dirs: &Dirs,
    volume: &str,
    height: u64,
    after: u64,
    existing: &[u64],
) -> std::io::Result<()> {
    update(dirs, volume, height, existing, |r| r.after = Some(after))
}

/// Record that the snapshot at `height` holds the node's durable state at
/// `durable`, keeping only entries for `existing` heights.
pub fn record_durable(
    dirs: &Dirs,
    volume: &str,
    height: u64,
    durable: u64,
    existing: &[u64],
) -> std::io::Result<()> {
    update(dirs, volume, height, existing, |r| {
        r.durable = Some(durable)
    })
}

fn update(
    dirs: &Dirs,
    volume: &str,
    height: u64,
    existing: &[u64],
    change: impl FnOnce(&mut Record),
) -> std::io::Result<()> {
    let mut all = records(dirs, volume);
    change(all.entry(height).or_default());
    all.retain(|h, _| existing.contains(h));
    let file = dirs.window_file(volume);
    let dir = file.parent().map(PathBuf::from).unwrap_or_default();
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(&all).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_files_are_read_and_both_heights_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let dirs = Dirs::under(dir.path());
        let file = dirs.window_file("pool/v");
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&file, br#"{"10":12,"20":21}"#).expect("write");
        assert_eq!(load(&dirs, "pool/v").get(&10), Some(&12));
        record_durable(&dirs, "pool/v", 20, 17, &[20, 30]).expect("record");
        record(&dirs, "pool/v", 30, 31, &[20, 30]).expect("record");
        let all = records(&dirs, "pool/v");
        assert_eq!(
            all.keys().copied().collect::<Vec<_>>(),
            [20, 30],
            "10 pruned"
        );
        assert_eq!(
            all[&20],
            Record {
                after: Some(21),
                durable: Some(17)
            }
        );
        assert_eq!(all[&30].durable, None);
    }
}
