//! The machine's own floors for the benchmarks: how fast one core hashes
//! (BLAKE3) and compresses (zstd level 1, btm's default) the kind of bytes
//! the benchmark datasets hold, half random and half repetitive. A backup
//! cannot beat `bytes / (rate × cores)`; `scripts/bench-chunk.sh` and
//! `scripts/bench-remote.sh` print these beside their figures.
//!
//! ```text
//! cargo run --release --example floors
//! ```

use std::time::Instant;

const MIB: usize = 1 << 20;

fn main() {
    // A cheap deterministic generator: the floors must not measure the RNG.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(256 * MIB);
    while data.len() < 128 * MIB {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let line = b"0123456789abcdef0123456789abcdef0123456789abcdef 42\n";
    while data.len() < 256 * MIB {
        data.extend_from_slice(line);
    }
    let rate = |secs: f64| (data.len() / MIB) as f64 / secs;

    let t = Instant::now();
    for chunk in data.chunks(MIB) {
        std::hint::black_box(blake3::hash(chunk));
    }
    println!(
        "floor: BLAKE3, one core: {:.0} MiB/s",
        rate(t.elapsed().as_secs_f64())
    );

    let mut cctx = match zstd::bulk::Compressor::new(1) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("floors: cannot start zstd: {e}");
            std::process::exit(1);
        }
    };
    let t = Instant::now();
    let mut stored = 0usize;
    for chunk in data.chunks(MIB) {
        match cctx.compress(chunk) {
            Ok(out) => stored += out.len(),
            Err(e) => {
                eprintln!("floors: zstd failed: {e}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "floor: zstd -1, one core: {:.0} MiB/s (ratio {:.2})",
        rate(t.elapsed().as_secs_f64()),
        data.len() as f64 / stored.max(1) as f64
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("floor: cores: {cores}");
}
