//! Height windows of polled snapshots.
//!
//! A polling daemon cannot know the exact height on disk at the instant of
//! a snapshot: it names the snapshot by the height read just before and
//! records the height read just after, so the snapshot holds a state
//! somewhere in `[height, height_after]`. (Push mode gives exact heights.)
//! The windows live in a small JSON file per volume under the state
//! directory, pruned to the snapshots that still exist whenever written.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use crate::dirs::Dirs;

/// The recorded `height → height_after` pairs for `volume`; empty when
/// none were recorded or the file is unreadable.
pub fn load(dirs: &Dirs, volume: &str) -> BTreeMap<u64, u64> {
    std::fs::read(dirs.window_file(volume))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
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
    let mut all = load(dirs, volume);
    all.insert(height, after);
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
