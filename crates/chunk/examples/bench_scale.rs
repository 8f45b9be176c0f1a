//! Scale benchmark (not a test): a store that has grown to millions of
//! chunks, as a terabyte of chain data in 1 MiB chunks makes it.
//!
//! ```text
//! bench_scale fill STORE [CHUNKS]   add pack indexes naming CHUNKS synthetic
//!                                   chunks (2,000,000) in 16-chunk packs
//! bench_scale known STORE           load what a backup loads (the known set)
//! bench_scale map STORE             load what a restore loads (the chunk map)
//! ```
//!
//! `known` and `map` print the time taken, the chunks loaded and how many
//! store requests of each kind were made, so that a step that lists every
//! pack or chunk shows up. `scripts/bench-scale.sh` runs them under GNU time
//! for the peak RSS, beside real `btm backup`, `restore` and `gc --dry-run`
//! runs against the same store. The synthetic packs do not exist: only their
//! index entries do, which is all the steps measured here read.

use std::sync::Arc;
use std::time::Instant;

use btm_chunk::format::pack::Blob;
use btm_chunk::format::packidx::{self, PackEntry};
use btm_chunk::map::{ChunkMap, KnownSet};
use btm_chunk::store::{Bytes, Counting, Id, Kind, Store};

/// Chunks per synthetic pack: 16 MiB packs of 1 MiB chunks.
const PER_PACK: u64 = 16;
/// Packs per pack index, as a backup writes them.
const PACKS_PER_INDEX: u64 = 64;

fn fill(store: &dyn Store, chunks: u64) -> Result<(), String> {
    let packs = chunks.div_ceil(PER_PACK);
    let mut written = 0u64;
    let mut n = 0u64;
    while n < packs {
        let batch: Vec<PackEntry> = (n..(n + PACKS_PER_INDEX).min(packs))
            .map(|p| {
                let blobs = (0..PER_PACK)
                    .map(|i| p * PER_PACK + i)
                    .filter(|&c| c < chunks)
                    .map(|c| Blob {
                        hash: Id::of(&c.to_le_bytes()),
                        offset: ((c % PER_PACK) * (1 << 20)) as u32,
                        stored_len: 1 << 20,
                        raw_len: 1 << 20,
                    })
                    .collect::<Vec<_>>();
                PackEntry {
                    id: Id::of(&(u64::MAX - p).to_le_bytes()),
                    len: blobs.len() as u64 * (1 << 20),
                    blobs,
                }
            })
            .collect();
        written += batch.iter().map(|p| p.blobs.len() as u64).sum::<u64>();
        let data = packidx::encode(&batch).map_err(|e| e.to_string())?;
        let id = Id::of(&data);
        store
            .put(Kind::PackIndex, &id, Bytes::from(data))
            .map_err(|e| e.to_string())?;
        n += PACKS_PER_INDEX;
    }
    store.flush().map_err(|e| e.to_string())?;
    println!("filled: {written} chunks in {packs} packs");
    Ok(())
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (step, url) = match args.as_slice() {
        [step, url, ..] => (step.as_str(), url.as_str()),
        _ => return Err("usage: bench_scale fill|known|map STORE [CHUNKS]".into()),
    };
    let store = url
        .parse()
        .and_then(|l| btm_chunk::store::open(&l, btm_chunk::store::Open::Write))
        .map_err(|e| e.to_string())?;
    let counting = Counting::new(Arc::clone(&store));
    let t = Instant::now();
    match step {
        "fill" => {
            let chunks = match args.get(2) {
                Some(n) => n.parse().map_err(|_| format!("not a number: {n}"))?,
                None => 2_000_000,
            };
            return fill(store.as_ref(), chunks);
        }
        "known" => {
            let known = KnownSet::load(&counting, None, 4).map_err(|e| e.to_string())?;
            println!("known set: {} chunks", known.len());
        }
        "map" => {
            let map = ChunkMap::load(&counting, None, 4).map_err(|e| e.to_string())?;
            println!(
                "chunk map: {} chunks in {} packs",
                map.entries().len(),
                map.packs().len()
            );
        }
        other => return Err(format!("unknown step {other:?}")),
    }
    println!("  time: {:.2} s", t.elapsed().as_secs_f64());
    for (what, n) in counting.by_request() {
        println!("  requests: {what}: {n}");
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_scale: {e}");
        std::process::exit(1);
    }
}
