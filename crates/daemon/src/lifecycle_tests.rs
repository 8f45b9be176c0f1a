//! The daemon's start-up and shutdown with every dependency faked: a stop
//! (what SIGTERM fires) at each stage of start-up returns at once, a stop
//! with a snapshot in flight waits for it, and the control socket is gone
//! afterwards. No root, no pool; the real signal handling is exercised by
//! the integration tests.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use btm::volume::fake::FakeVolume;
use btm::volume::Volume;
use btm::{BtmCfg, Ops};

use crate::settings::DaemonSettings;
use crate::{run_with, shutdown_channel, Deps};

struct Rig {
    settings: DaemonSettings,
    volume: Arc<FakeVolume>,
    dir: tempfile::TempDir,
}

fn rig(extra: &str) -> Rig {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = format!("socket = \"{}\"\n", dir.path().join("btm.sock").display());
    let settings = crate::test_support::settings(&(socket + extra), dir.path());
    let volume = crate::test_support::fake_volume(dir.path());
    Rig {
        settings,
        volume,
        dir,
    }
}

impl Rig {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("btm.sock")
    }

    /// Deps opening the fake volume; with `gate`, opening waits for a
    /// message on it (after sending one on `entered`).
    fn deps(&self, gate: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>) -> Deps {
        let volume = Arc::clone(&self.volume);
        let gate = gate.map(std::sync::Mutex::new);
        Deps {
            open_volume: Arc::new(move |s: &DaemonSettings| {
                if let Some(g) = &gate {
                    let g = g.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = g.0.send(());
                    let _ = g.1.recv();
                }
                let cfg = BtmCfg {
                    volume: s.volume.clone(),
                    ..BtmCfg::default()
                };
                let heights = volume.heights()?;
                let v: Arc<dyn Volume> = Arc::clone(&volume) as Arc<dyn Volume>;
                Ok((cfg, Ops::new(v, s.dirs.clone()), heights))
            }),
            open_store: Deps::default().open_store,
        }
    }

    fn notify(&self, height: u64) -> std::thread::JoinHandle<Option<btm::protocol::NotifyReply>> {
        let socket = self.socket();
        std::thread::spawn(move || {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(r) = btm::client::notify(&socket, height, Duration::from_secs(10)) {
                    return Some(r);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
    }
}

/// Run the daemon until `stop` returns, then fire the shutdown and check
/// the daemon ends within two seconds, cleanly, with its socket gone.
async fn run_until(rig: &Rig, deps: Deps, stop: impl std::future::Future<Output = ()>) {
    let (trigger, shutdown) = shutdown_channel();
    let daemon = tokio::spawn(run_with(rig.settings.clone(), shutdown, deps));
    stop.await;
    trigger.fire();
    let ended = tokio::time::timeout(Duration::from_secs(2), daemon)
        .await
        .expect("the daemon stops within 2 s")
        .expect("no panic");
    assert!(ended.is_ok(), "{ended:?}");
    assert!(!rig.socket().exists(), "the control socket is left behind");
}

#[tokio::test]
async fn a_stop_before_start_ends_it_at_once() {
    let r = rig("");
    run_until(&r, r.deps(None), async {}).await;
    assert!(r.volume.heights().expect("heights").is_empty());
}

#[tokio::test]
async fn a_stop_while_the_volume_opens_ends_it_at_once() {
    let r = rig("");
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let deps = r.deps(Some((entered_tx, release_rx)));
    run_until(&r, deps, async move {
        tokio::task::spawn_blocking(move || entered.recv().expect("opening"))
            .await
            .expect("join");
    })
    .await;
    let _ = release.send(());
}

#[tokio::test]
async fn a_stop_during_the_first_poll_ends_it_at_once() {
    let r = rig(
        "source = \"command\"\nheight_command = [\"sleep\", \"2\"]\nsource_timeout = \"60s\"\n",
    );
    run_until(&r, r.deps(None), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
    .await;
}

#[tokio::test]
async fn once_ready_it_snapshots_pushed_heights_and_stops() {
    let r = rig("");
    let notify = r.notify(10);
    run_until(&r, r.deps(None), async {
        let reply = tokio::task::spawn_blocking(move || notify.join())
            .await
            .expect("join")
            .expect("no panic")
            .expect("the daemon answered");
        assert_eq!(reply.outcome, btm::protocol::Outcome::Created);
    })
    .await;
    assert_eq!(r.volume.heights().expect("heights"), vec![10]);
}

#[tokio::test]
async fn a_stop_with_a_snapshot_in_flight_lets_it_finish() {
    let r = rig("[hooks]\npre_snapshot = [\"sleep\", \"0.5\"]\n");
    let notify = r.notify(10);
    let volume = Arc::clone(&r.volume);
    run_until(&r, r.deps(None), async move {
        // The hook runs before the snapshot: stop while it sleeps.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(volume.heights().expect("heights").is_empty());
    })
    .await;
    assert_eq!(r.volume.heights().expect("heights"), vec![10]);
    let reply = notify.join().expect("no panic").expect("answered");
    assert_eq!(reply.outcome, btm::protocol::Outcome::Created);
}
