//! Benchmark helper for `scripts/bench-daemon.sh`: from one process,
//! alternately take a bare `btrfs subvolume snapshot -r` and push a height
//! to a running daemon with `btm::client::notify` (what a Rust node calls
//! at its commit boundary), and print per-round microseconds as
//! `bare push` pairs.
//!
//! Usage: notify_latency VOLUME BARE_DIR SOCKET ROUNDS FIRST_HEIGHT

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, volume, bare_dir, socket, rounds, first] = args.as_slice() else {
        eprintln!("usage: notify_latency VOLUME BARE_DIR SOCKET ROUNDS FIRST_HEIGHT");
        std::process::exit(2);
    };
    let rounds: u64 = rounds.parse().expect("ROUNDS is a number");
    let first: u64 = first.parse().expect("FIRST_HEIGHT is a number");
    for i in 0..rounds {
        let target = Path::new(bare_dir).join(format!("lib{i}"));
        let t = Instant::now();
        let ok = Command::new("btrfs")
            .args(["subvolume", "snapshot", "-r", volume])
            .arg(&target)
            .output()
            .expect("btrfs runs")
            .status
            .success();
        let bare = t.elapsed();
        assert!(ok, "bare snapshot failed");
        let t = Instant::now();
        let reply = btm::client::notify(Path::new(socket), first + i, Duration::from_secs(60))
            .expect("notify");
        let push = t.elapsed();
        assert_eq!(reply.outcome, btm::protocol::Outcome::Created, "{reply:?}");
        println!("{} {}", bare.as_micros(), push.as_micros());
    }
}
