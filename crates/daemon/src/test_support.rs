//! What the daemon's unit tests share: settings for a fake volume named
//! `tank/chain` with every directory in a temporary one, and the fake.

use std::path::Path;
use std::sync::Arc;

use btm::volume::fake::FakeVolume;

use crate::settings::{DaemonOptions, DaemonSettings};

/// The settings of `volume = "tank/chain"`, ZFS, plus the TOML `extra`;
/// btm's directories (and an export's cache) under `dir`.
pub fn settings(extra: &str, dir: &Path) -> DaemonSettings {
    let text = format!("volume = \"tank/chain\"\nmode = \"zfs\"\n{extra}");
    let mut s = DaemonOptions::from_toml(&text, Path::new("test.toml"))
        .expect("test settings parse")
        .resolve()
        .expect("test settings are valid");
    s.dirs = btm::dirs::Dirs::under(dir);
    if let Some(e) = s.export.as_mut() {
        e.cache = Some(dir.join("cache"));
    }
    s
}

/// The `BtmCfg` of those settings.
pub fn cfg(s: &DaemonSettings) -> btm::BtmCfg {
    btm::BtmCfg {
        itv: s.itv,
        cap: s.cap,
        mode: btm::SnapMode::Zfs,
        algo: s.algo,
        volume: s.volume.clone(),
    }
}

/// A fake `tank/chain` under `dir/vol`.
pub fn fake_volume(dir: &Path) -> Arc<FakeVolume> {
    Arc::new(
        FakeVolume::new("tank/chain", btm::SnapMode::Zfs, &dir.join("vol")).expect("fake volume"),
    )
}
