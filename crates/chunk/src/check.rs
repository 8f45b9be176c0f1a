//! `btm check`: is the store sound? Every backup index is read through the
//! same validator a restore uses (a hostile or inconsistent index is a
//! problem here, not first at restore time), every chunk it references
//! must be in a pack the store holds, and with `read_data` every pack is
//! read back: its trailer must match the pack indexes, and every chunk must
//! decompress to bytes with its hash. Objects that are not part of the
//! format (odd names under `indexes/`) are ignored, as the format says.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::cache::Cache;
use super::format::head::Decoded;
use super::format::pack::{self, open_frame};
use super::format::tree::Item;
use super::map::ChunkMap;
use super::{inventory, with_retry, ChunkError};
use crate::store::{Id, Kind, Store};

/// What `check` found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CheckReport {
    /// Backup indexes read.
    pub indexes: u64,
    /// Distinct chunks referenced.
    pub chunks: u64,
    /// Packs in the chunk map.
    pub packs: u64,
    /// Chunks whose data was read and verified (`read_data`).
    pub chunks_verified: u64,
    /// Problems, one line each.
    pub problems: Vec<String>,
}

/// Verify the store (see the module documentation).
pub fn check(
    store: &dyn Store,
    read_data: bool,
    cache: Option<&Cache>,
    connections: usize,
) -> Result<CheckReport, ChunkError> {
    let mut report = CheckReport::default();
    let mut problems = Vec::new();
    let map = ChunkMap::load_or(store, cache, connections, |id, e| {
        problems.push(format!("pack index {id}: {e}"));
        Ok(())
    })?;
    report.problems = problems;
    report.packs = map.packs().len() as u64;
    let present: HashMap<Id, u64> = with_retry(store, || store.list(Kind::Pack))
        .map_err(|e| ChunkError::store("listing packs", e))?
        .into_iter()
        .collect();
    missing_packs(&map, &present, &mut report);
    let mut refs = Refs {
        referenced: vec![false; map.entries().len()],
        v1_refs: HashSet::new(),
        v1_present: None,
    };
    for name in inventory::list_backups(store, None)? {
        report.indexes += 1;
        check_backup(
            store,
            cache,
            connections,
            &name.to_string(),
            &map,
            &mut refs,
            &mut report,
        )?;
    }
    let Refs {
        referenced,
        v1_refs,
        v1_present,
    } = refs;
    report.chunks = referenced.iter().filter(|&&r| r).count() as u64 + v1_refs.len() as u64;
    if read_data {
        verify_packs(store, &map, &present, connections, &mut report);
        verify_v1(
            store,
            &v1_refs,
            v1_present.as_ref(),
            connections,
            &mut report,
        );
    }
    Ok(report)
}

/// Which chunks the backups reference: positions in the chunk map, and for
/// version 1 backups, object ids (with the v1 objects present, listed once
/// when the first v1 backup shows up).
struct Refs {
    referenced: Vec<bool>,
    v1_refs: HashSet<Id>,
    v1_present: Option<HashSet<Id>>,
}

/// Packs a pack index names that the store lacks or holds at another size.
fn missing_packs(map: &ChunkMap, present: &HashMap<Id, u64>, report: &mut CheckReport) {
    for p in map.packs() {
        match present.get(&p.id) {
            None => report.problems.push(format!(
                "pack {} is named by a pack index but missing",
                p.id
            )),
            Some(&len) if len != p.len => report.problems.push(format!(
                "pack {} is {len} bytes; its pack index says {}",
                p.id, p.len
            )),
            Some(_) => {}
        }
    }
}

/// Read one backup's index and entries, marking every chunk it references
/// and reporting those the store lacks. An unreadable index or tree is a
/// problem in the report; a store failure is an error.
fn check_backup(
    store: &dyn Store,
    cache: Option<&Cache>,
    connections: usize,
    name: &str,
    map: &ChunkMap,
    refs: &mut Refs,
    report: &mut CheckReport,
) -> Result<(), ChunkError> {
    let idx = match inventory::read_index(store, name) {
        Ok(i) => i,
        Err(e @ (ChunkError::Index(_) | ChunkError::NoBackup(_))) => {
            report.problems.push(e.to_string());
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let v1 = matches!(idx, Decoded::V1(_));
    if v1 && refs.v1_present.is_none() {
        refs.v1_present = Some(
            with_retry(store, || store.list(Kind::Chunk))
                .map_err(|e| ChunkError::store("listing version 1 chunks", e))?
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
        );
    }
    let mut entries = inventory::entries(store, cache, name, &idx, connections);
    let mut file = String::new();
    loop {
        let item = match entries.next_item() {
            Ok(Some(i)) => i,
            Ok(None) => return Ok(()),
            Err(e @ (ChunkError::Index(_) | ChunkError::Format(_))) => {
                report.problems.push(e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let chunks = match item {
            Item::Entry(e) => {
                file = e.display().into_owned();
                continue;
            }
            Item::Chunks(chunks) => chunks,
        };
        for h in chunks.iter().filter_map(|c| c.hash) {
            let found = match &refs.v1_present {
                Some(present) if v1 => {
                    refs.v1_refs.insert(h);
                    present.contains(&h)
                }
                _ => map
                    .position(&h)
                    .map(|i| refs.referenced[i] = true)
                    .is_some(),
            };
            if !found {
                report
                    .problems
                    .push(format!("backup {name}: file {file}: chunk {h} is missing"));
            }
        }
    }
}

/// Read every pack the store has and the map names; compare its trailer
/// with the map and verify each chunk.
fn verify_packs(
    store: &dyn Store,
    map: &ChunkMap,
    present: &HashMap<Id, u64>,
    connections: usize,
    report: &mut CheckReport,
) {
    // Every chunk of every pack as the pack indexes list it, by pack.
    let mut by_pack: HashMap<u32, Vec<(Id, u32, u32, u32)>> = HashMap::new();
    for e in map.entries() {
        by_pack
            .entry(e.pack)
            .or_default()
            .push((e.hash, e.offset, e.stored_len, e.raw_len));
    }
    let numbers: Vec<u32> = (0..map.packs().len() as u32)
        .filter(|n| present.contains_key(&map.packs()[*n as usize].id))
        .collect();
    let results = crate::pipeline::pool::map(&numbers, connections, |&n| {
        let info = map.packs()[n as usize];
        let what = format!("pack {}", info.id);
        let data = match with_retry(store, || store.get(Kind::Pack, &info.id)) {
            Ok(d) => d,
            Err(e) => return (0, vec![format!("{what}: {e}")]),
        };
        let mut problems = Vec::new();
        if Id::of(&data) != info.id {
            problems.push(format!("{what}: content does not match its name"));
        }
        let blobs = match pack::read_pack(&data, &what) {
            Ok(b) => b,
            Err(e) => return (0, vec![e.to_string()]),
        };
        let listed: HashSet<(Id, u32, u32, u32)> = blobs
            .iter()
            .map(|b| (b.hash, b.offset, b.stored_len, b.raw_len))
            .collect();
        for want in by_pack.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
            if !listed.contains(want) {
                problems.push(format!(
                    "{what}: chunk {} is not where its pack index says",
                    want.0
                ));
            }
        }
        let mut verified = 0;
        let Ok(mut dctx) = zstd::bulk::Decompressor::new() else {
            return (0, vec![format!("{what}: cannot start zstd")]);
        };
        let mut out = Vec::new();
        for b in &blobs {
            let frame = &data[b.offset as usize..(b.offset + b.stored_len) as usize];
            match open_frame(frame, &b.hash, u64::from(b.raw_len), &mut dctx, &mut out) {
                Ok(()) => verified += 1,
                Err(e) => problems.push(format!("{what}: chunk {}: {e}", b.hash)),
            }
        }
        (verified, problems)
    });
    for (verified, problems) in results {
        report.chunks_verified += verified;
        report.problems.extend(problems);
    }
}

/// Read and verify every referenced version 1 chunk that exists.
fn verify_v1(
    store: &dyn Store,
    refs: &HashSet<Id>,
    present: Option<&HashSet<Id>>,
    connections: usize,
    report: &mut CheckReport,
) {
    let Some(present) = present else { return };
    let wanted: Vec<Id> = refs
        .iter()
        .filter(|h| present.contains(h))
        .copied()
        .collect();
    let results = crate::pipeline::pool::map(&wanted, connections, |h| -> Result<(), String> {
        let data = with_retry(store, || store.get(Kind::Chunk, h))
            .map_err(|e| format!("chunk {h}: {e}"))?;
        match zstd::stream::decode_all(&data[..]) {
            Ok(raw) if Id::of(&raw) == *h => Ok(()),
            Ok(_) => Err(format!("chunk {h}: content does not match its hash")),
            Err(e) => Err(format!("chunk {h}: cannot decompress: {e}")),
        }
    });
    for r in results {
        match r {
            Ok(()) => report.chunks_verified += 1,
            Err(p) => report.problems.push(p),
        }
    }
}
