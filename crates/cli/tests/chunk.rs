//! The sparse chunk engine against a local store: byte- and hole-exact
//! round trips, incremental and append-only backups, in-place restores over
//! damaged trees, and every broken or hostile input failing loudly.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use btm_chunk::format::head::{Head, IndexName, Totals, FORMAT_VERSION};
use btm_chunk::format::tree::{Entry, EntryKind, TreeWriter};
use btm_chunk::format::v1;
use btm_chunk::store::{Kind, LocalStore, Store};
use common::btm;

const MB: u64 = 1 << 20;

fn write_at(path: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open");
    f.write_all_at(data, off).expect("write");
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    common::noise(seed, n)
}

/// Byte-exact comparison of two trees (files, symlinks, modes, mtimes),
/// with every restored file at least as sparse as its original.
fn assert_same_tree(a: &Path, b: &Path) {
    let out = std::process::Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .expect("diff");
    assert!(
        out.status.success(),
        "trees differ: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for entry in walk(a) {
        let rel = entry.strip_prefix(a).expect("prefix");
        let (ma, mb) = (
            fs::symlink_metadata(&entry).expect("a"),
            fs::symlink_metadata(b.join(rel)).expect("b"),
        );
        assert_eq!(ma.mode(), mb.mode(), "{}", rel.display());
        if ma.is_file() {
            assert!(
                mb.blocks() <= ma.blocks(),
                "{} is less sparse than the original: {} > {} blocks",
                rel.display(),
                mb.blocks(),
                ma.blocks()
            );
            assert_eq!(ma.mtime(), mb.mtime(), "{}", rel.display());
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).expect("ls") {
        let p = e.expect("entry").path();
        if fs::symlink_metadata(&p).expect("m").is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn json(run: common::Run) -> serde_json::Value {
    serde_json::from_str(&run.ok()).expect("json")
}

struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    /// A small state-like tree: a sparse file with scattered data, a zero
    /// file, ordinary files, a symlink, a nested directory.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("data/sub")).expect("mkdir");
        let sparse = src.join("data/state.db");
        fs::File::create(&sparse)
            .expect("create")
            .set_len(64 * MB)
            .expect("len");
        for (i, off) in [3 * MB, 17 * MB + 12345, 40 * MB].iter().enumerate() {
            write_at(&sparse, *off, &random(300_000, i as u64));
        }
        fs::write(src.join("data/zeros"), vec![0u8; 3 * MB as usize]).expect("zeros");
        fs::write(src.join("data/sub/config.toml"), b"moniker = \"x\"\n").expect("w");
        fs::write(
            src.join("data/blocks.log"),
            random(2 * MB as usize + 100, 9),
        )
        .expect("w");
        std::os::unix::fs::symlink("sub/config.toml", src.join("data/link")).expect("symlink");
        fs::set_permissions(
            src.join("data/sub/config.toml"),
            fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        Tree { dir }
    }
    fn src(&self) -> std::path::PathBuf {
        self.dir.path().join("src")
    }
    fn store(&self) -> String {
        self.dir.path().join("store").display().to_string()
    }
    fn p(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }
    fn btm(&self, args: &[&str]) -> common::Run {
        let store = self.store();
        let mut all = args.to_vec();
        all.extend(["-s", &store]);
        btm(self.dir.path(), &all)
    }
    fn backup(&self, extra: &[&str]) -> serde_json::Value {
        let src = self.src();
        let mut args = vec![
            "backup",
            src.to_str().expect("utf8"),
            "--json",
            "--chunk-size",
            "1M",
        ];
        args.extend_from_slice(extra);
        json(self.btm(&args))
    }
}

#[test]
fn sparse_round_trip_is_byte_and_hole_exact() {
    let t = Tree::new();
    let s = t.backup(&["-t", "prod"]);
    // 64 MiB sparse with ~1 MiB of data: holes are neither read nor stored.
    assert!(s["bytes_read"].as_u64().expect("n") < 10 * MB, "{s}");
    assert!(s["chunks_empty"].as_u64().expect("n") >= 60, "{s}");
    let dst = t.p("dst");
    json(t.btm(&[
        "restore",
        "latest",
        dst.to_str().expect("utf8"),
        "-t",
        "prod",
        "--json",
    ]));
    assert_same_tree(&t.src(), &dst);
    let zeros = fs::metadata(dst.join("data/zeros")).expect("m");
    assert_eq!(zeros.blocks(), 0, "an all-zero file is restored as a hole");
    let show = json(t.btm(&[
        "backups",
        "show",
        s["name"].as_str().expect("name"),
        "--json",
    ]));
    assert_eq!(show["backup"]["format"], FORMAT_VERSION);
    json(t.btm(&["check", "--read-data", "--json"]));
}

#[test]
fn incremental_backups_read_only_what_changed() {
    let t = Tree::new();
    let first = t.backup(&["--appendonly", "data/blocks.log"]);
    assert!(first["bytes_read"].as_u64().expect("n") > 2 * MB);
    let again = t.backup(&["--appendonly", "data/blocks.log"]);
    assert_eq!(
        again["bytes_read"], 0,
        "nothing changed: nothing read ({again})"
    );
    assert_eq!(again["files_unchanged"], 4);
    let forced = t.backup(&["--force-read"]);
    assert!(
        forced["bytes_read"].as_u64().expect("n") > 2 * MB,
        "{forced}"
    );
    assert_eq!(forced["chunks_uploaded"], 0, "same data: nothing uploaded");

    // Restore the current state, then grow the log by exactly one byte.
    let dst = t.p("dst");
    t.btm(&["restore", "latest", dst.to_str().expect("utf8")])
        .ok();
    let log = t.src().join("data/blocks.log");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("open");
    std::io::Write::write_all(&mut f, b"!").expect("append");
    drop(f);
    let grown = t.backup(&["--appendonly", "data/blocks.log"]);
    // Only the previous last, partial chunk (100 bytes + 1 new) is read.
    assert_eq!(grown["bytes_read"], 101, "{grown}");
    let r = json(t.btm(&["restore", "latest", dst.to_str().expect("utf8"), "--json"]));
    assert_eq!(
        r["summary"]["chunks_fetched"], 1,
        "only the log's tail moves: {r}"
    );
    assert_same_tree(&t.src(), &dst);
}

/// Tree segments are cut by content, so an incremental backup of a large
/// tree in which one file changed uploads only that file's segment: the
/// others come out identical to the previous backup's and are not sent
/// again (a round trip each, to a remote store).
#[test]
fn an_incremental_uploads_only_the_tree_segment_that_changed() {
    let t = Tree::new();
    for i in 0..70_000 {
        let d = t.src().join(format!("accounts/{:02}", i % 20));
        if i < 20 {
            fs::create_dir_all(&d).expect("mkdir");
        }
        fs::write(d.join(format!("{i:06}")), format!("account {i}")).expect("w");
    }
    let segments = || {
        fs::read_dir(t.p("store/trees"))
            .expect("trees")
            .flat_map(|d| fs::read_dir(d.expect("fan-out").path()).expect("fan-out"))
            .count()
    };
    let first = t.backup(&[]);
    let before = segments();
    assert!(
        first["trees"].as_u64().expect("n") >= 3,
        "the test needs several segments: {first}"
    );
    assert_eq!(before as u64, first["trees"].as_u64().expect("n"));
    assert_eq!(first["trees_uploaded"], first["trees"]);
    fs::write(t.src().join("accounts/07/010007"), "changed").expect("w");
    let second = t.backup(&[]);
    assert_eq!(second["trees"], first["trees"], "{second}");
    assert_eq!(segments(), before + 1, "one segment changed: {second}");
    assert_eq!(second["trees_uploaded"], 1, "{second}");
    let dst = t.p("dst");
    t.btm(&["restore", "latest", dst.to_str().expect("utf8")])
        .ok();
    assert_same_tree(&t.src(), &dst);
    json(t.btm(&["check", "--read-data", "--json"]));
}

/// A file that grew by several chunks took the chunks of the entries after
/// it from the previous backup's stream, and the backup then failed with
/// "the previous backup's record of … is shorter than the file".
#[test]
fn a_file_grown_by_many_chunks_leaves_the_next_files_records_alone() {
    let t = Tree::new();
    let first = t.backup(&["--appendonly", "data/blocks.log"]);
    assert!(first["bytes_read"].as_u64().expect("n") > 2 * MB);
    let log = t.src().join("data/blocks.log");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("open");
    std::io::Write::write_all(&mut f, &random(5 * MB as usize, 11)).expect("append");
    drop(f);
    // A plain file grown the same way, not declared append-only.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(t.src().join("data/zeros"))
        .expect("open");
    std::io::Write::write_all(&mut f, &random(4 * MB as usize, 12)).expect("append");
    drop(f);
    for flags in [&["--appendonly", "data/blocks.log"][..], &[][..]] {
        let grown = t.backup(flags);
        assert!(
            grown["files_unchanged"].as_u64().expect("n") >= 2,
            "the files after the grown ones are still reused unread: {grown}"
        );
    }
    let dst = t.p("dst");
    t.btm(&["restore", "latest", dst.to_str().expect("utf8")])
        .ok();
    assert_same_tree(&t.src(), &dst);
}

#[test]
fn restore_repairs_a_damaged_tree_in_place() {
    let t = Tree::new();
    t.backup(&[]);
    let dst = t.p("dst");
    let d = dst.to_str().expect("utf8");
    t.btm(&["restore", "latest", d]).ok();
    write_at(&dst.join("data/state.db"), 20 * MB, b"garbage in a hole");
    write_at(
        &dst.join("data/state.db"),
        3 * MB + 10,
        b"garbage over data",
    );
    fs::OpenOptions::new()
        .write(true)
        .open(dst.join("data/blocks.log"))
        .expect("o")
        .set_len(MB)
        .expect("truncate");
    fs::OpenOptions::new()
        .write(true)
        .open(dst.join("data/zeros"))
        .expect("o")
        .set_len(9 * MB)
        .expect("grow");
    fs::remove_file(dst.join("data/sub/config.toml")).expect("rm");
    fs::remove_file(dst.join("data/link")).expect("rm");
    fs::write(dst.join("data/link"), b"a file where a symlink was").expect("w");
    fs::write(dst.join("extra"), b"not in the backup").expect("w");
    let r = json(t.btm(&["restore", "latest", d, "--json"]));
    assert!(
        r["summary"]["chunks_reused"].as_u64().expect("n") > 0,
        "{r}"
    );
    assert!(dst.join("extra").exists(), "kept without --delete");
    fs::remove_file(dst.join("extra")).expect("rm");
    assert_same_tree(&t.src(), &dst);
    fs::write(dst.join("extra"), b"x").expect("w");
    let r = json(t.btm(&["restore", "latest", d, "--delete", "--json"]));
    assert_eq!(r["summary"]["deleted"], 1);
    assert_same_tree(&t.src(), &dst);
}

/// The packs of a local store, with the chunks each holds.
fn packs(store: &Path) -> Vec<(std::path::PathBuf, Vec<btm_chunk::format::pack::Blob>)> {
    walk(&store.join("packs"))
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let data = fs::read(&p).expect("read pack");
            let blobs = btm_chunk::format::pack::read_pack(&data, "pack").expect("parse");
            (p, blobs)
        })
        .collect()
}

#[test]
fn corrupt_and_missing_chunks_fail_loudly() {
    let t = Tree::new();
    t.backup(&[]);
    let all = packs(&t.p("store"));
    assert_eq!(all.len(), 1, "one small backup, one pack");
    let (pack, blobs) = &all[0];
    let victim = blobs[0];
    let hash = victim.hash.to_hex();
    // Flip bytes inside the first chunk's frame.
    write_at(pack, u64::from(victim.offset) + 4, b"not zstd at all");
    let dst = t.p("dst");
    let err = t
        .btm(&["restore", "latest", dst.to_str().expect("utf8")])
        .fails(1);
    assert!(err.contains(&hash) && err.contains("file data/"), "{err}");
    let err = t.btm(&["check", "--read-data"]).fails(1);
    assert!(err.contains("problem"), "{err}");

    fs::remove_file(pack).expect("rm");
    let err = t
        .btm(&["restore", "latest", t.p("dst2").to_str().expect("utf8")])
        .fails(1);
    assert!(err.contains("missing"), "{err}");
    let out = t.btm(&["check"]);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("missing"), "{}", out.stdout);
}

/// Write a version 1 index by hand (what btm wrote before format 2).
fn put_v1_index(store: &LocalStore, tag: &str, entries: Vec<v1::V1Entry>) -> String {
    let name = IndexName::new(chrono::Utc::now(), tag).to_string();
    let idx = v1::Index {
        format: 1,
        chunk_size: MB,
        created: chrono::Utc::now(),
        tag: tag.into(),
        meta: serde_json::Map::new(),
        entries,
    };
    let json = serde_json::to_vec(&idx).expect("json");
    store
        .put_index(&name, &zstd::bulk::compress(&json, 3).expect("zstd"))
        .expect("put");
    name
}

fn v1_entry(path: &str, kind: v1::V1Kind) -> v1::V1Entry {
    v1::V1Entry {
        path: path.into(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        ino: 0,
        append_only: false,
    }
}

/// Write a version 2 backup whose entries are given as they are: the
/// writer does not police order or paths, which is what a forged or broken
/// store would hold.
fn put_v2_index(
    store: &LocalStore,
    tag: &str,
    entries: &[(Entry, Vec<btm_chunk::format::tree::ChunkRef>)],
) -> String {
    let mut w = TreeWriter::new(1);
    let mut trees = Vec::new();
    for (e, chunks) in entries {
        trees.extend(w.entry(e).expect("entry"));
        if !chunks.is_empty() {
            trees.extend(w.chunks(chunks).expect("chunks"));
        }
    }
    let (last, totals) = w.finish().unwrap_or_else(|_| (None, Totals::default()));
    trees.extend(last);
    for seg in &trees {
        store
            .put(Kind::Tree, &seg.id, seg.data.clone().into())
            .expect("tree");
    }
    let name = IndexName::new(chrono::Utc::now(), tag).to_string();
    let head = Head {
        format: FORMAT_VERSION,
        created: chrono::Utc::now(),
        tag: tag.into(),
        chunk_size: MB,
        meta: serde_json::Map::new(),
        trees: trees.iter().map(|s| s.id).collect(),
        totals,
        excluded: Vec::new(),
    };
    store
        .put_index(&name, &head.encode().expect("encode"))
        .expect("put");
    name
}

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        ino: 0,
        append_only: false,
        linked: false,
    }
}

#[test]
fn hostile_indexes_write_nothing_outside() {
    let t = Tree::new();
    let store = LocalStore::open(&t.store()).expect("store");
    let outside = t.p("outside");
    fs::create_dir(&outside).expect("mkdir");
    let empty_file = || v1::V1Kind::File {
        size: 0,
        chunks: vec![],
    };
    let v1_cases = vec![
        vec![v1_entry("../escape", empty_file())],
        vec![v1_entry("/etc/btm-pwned", empty_file())],
        vec![v1_entry("a/../../escape", empty_file())],
        vec![
            v1_entry(
                "link",
                v1::V1Kind::Symlink {
                    target: outside.display().to_string(),
                },
            ),
            v1_entry("link/pwned", empty_file()),
        ],
        vec![v1_entry(
            "big",
            v1::V1Kind::File {
                size: 10,
                chunks: vec![],
            },
        )],
    ];
    let mut names: Vec<String> = v1_cases
        .into_iter()
        .map(|entries| put_v1_index(&store, "evil", entries))
        .collect();
    let link = EntryKind::Symlink {
        target: outside.display().to_string().into_bytes(),
    };
    let v2_cases = vec![
        vec![(entry("../escape", EntryKind::File { size: 0 }), vec![])],
        vec![(entry("/etc/btm-pwned", EntryKind::File { size: 0 }), vec![])],
        vec![
            (entry("link", link), vec![]),
            (entry("link/pwned", EntryKind::File { size: 0 }), vec![]),
        ],
        vec![(
            entry("missing-parent/x", EntryKind::File { size: 0 }),
            vec![],
        )],
    ];
    names.extend(
        v2_cases
            .into_iter()
            .map(|entries| put_v2_index(&store, "evil2", &entries)),
    );
    for name in &names {
        let dst = t.p("dst");
        let err = t
            .btm(&["restore", name, dst.to_str().expect("utf8")])
            .fails(1);
        assert!(err.contains("unreadable"), "{name}: {err}");
        let _ = fs::remove_dir_all(&dst);
    }
    assert_eq!(
        fs::read_dir(&outside).expect("ls").count(),
        0,
        "something escaped"
    );
    assert!(!t.p("escape").exists() && !Path::new("/etc/btm-pwned").exists());
}

/// A store that fails at each put in turn: the backup fails, writes no
/// index, and a pack it uploaded but could not index is recorded in its
/// lease (for GC, see gc.rs); the next backup succeeds and checks clean.
#[test]
fn a_failing_store_leaves_no_index() {
    for budget in 0..3 {
        let t = Tree::new();
        let flaky = common::FaultyStore::new(Path::new(&t.store()), budget, i64::MAX);
        let mut opts = btm_chunk::backup::BackupOptions::new("prod", btm_chunk::Policy::NONE);
        opts.chunk_size = MB;
        let err = btm_chunk::Repo::new(flaky.clone())
            .with_cache(None)
            .backup(&t.src(), &opts)
            .expect_err("must fail");
        assert!(
            err.to_string().contains("connection reset"),
            "{budget}: {err}"
        );
        assert!(
            flaky.list_indexes().expect("list").is_empty(),
            "an index was written for a failed backup"
        );
        let packs = flaky.list(Kind::Pack).expect("list");
        if !packs.is_empty() && flaky.list(Kind::PackIndex).expect("list").is_empty() {
            let locks = flaky.list_markers("locks").expect("locks");
            assert_eq!(locks.len(), 1, "the lease stays to tell GC: {locks:?}");
            let body: serde_json::Value =
                serde_json::from_slice(&flaky.get_marker(&locks[0].name).expect("body"))
                    .expect("json");
            assert_eq!(body["pending"][0], packs[0].0.to_hex(), "{body}");
        }
        let s = t.backup(&["-t", "prod"]);
        assert!(s["name"].is_string(), "{s}");
        json(t.btm(&["check", "--read-data", "--json"]));
        let dst = t.p("dst");
        t.btm(&[
            "restore",
            "latest",
            dst.to_str().expect("utf8"),
            "-t",
            "prod",
        ])
        .ok();
        assert_same_tree(&t.src(), &dst);
    }
}

#[test]
fn tags_match_exactly_and_height_selects() {
    let t = Tree::new();
    for (tag, height) in [
        ("prod", 100),
        ("prod2", 150),
        ("preprod", 160),
        ("prod", 200),
        ("prod", 300),
        ("xprod", 400),
    ] {
        t.backup(&["-t", tag, "-m", &format!("{{\"height\":{height}}}")]);
    }
    let list = t.btm(&["backups", "-t", "prod"]).ok();
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(list.lines().all(|l| l.ends_with("--prod")), "{list}");
    let dst = t.p("dst");
    let r = json(t.btm(&[
        "restore",
        "latest",
        dst.to_str().expect("utf8"),
        "-t",
        "prod",
        "--height",
        "250",
        "--json",
    ]));
    let name = r["name"].as_str().expect("name");
    let show = json(t.btm(&["backups", "show", name, "--json"]));
    assert_eq!(show["backup"]["meta"]["height"], 200);
    // With only a directory, `latest` is implied: `btm restore --height H DIR`.
    let r2 = json(t.btm(&[
        "restore",
        "--height",
        "250",
        "-t",
        "prod",
        dst.to_str().expect("utf8"),
        "--json",
    ]));
    assert_eq!(r2["name"], r["name"]);
    t.btm(&["restore", "a", "b", "c"]).fails(2);
    let err = t
        .btm(&[
            "restore",
            "latest",
            dst.to_str().expect("utf8"),
            "-t",
            "prod",
            "--height",
            "50",
        ])
        .fails(1);
    assert!(err.contains("height 50"), "{err}");
    let long = json(t.btm(&["backups", "--json", "--limit", "2"]));
    assert_eq!(long.as_array().expect("array").len(), 2);
    t.btm(&["backup", "/nonexistent/dir"]).fails(1);
    t.btm(&["backup", t.src().to_str().expect("utf8"), "-t", "bad/tag"])
        .fails(1);
    t.btm(&["backup", t.src().to_str().expect("utf8"), "-m", "[1]"])
        .fails(2);
    t.btm(&["restore", "nope", dst.to_str().expect("utf8")])
        .fails(1);
    btm(t.dir.path(), &["backups", "-s", "ftp://x/y"]).fails(1);
}

#[test]
fn filters_and_metadata() {
    let t = Tree::new();
    fs::set_permissions(
        t.src().join("data/zeros"),
        fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    std::os::unix::fs::lchown(t.src().join("data/zeros"), Some(1234), Some(5678)).expect("chown");
    t.backup(&["--filter", "^data/(sub|zeros)"]);
    let dst = t.p("dst");
    t.btm(&["restore", "latest", dst.to_str().expect("utf8")])
        .ok();
    assert!(dst.join("data/sub/config.toml").exists() && dst.join("data/zeros").exists());
    assert!(!dst.join("data/state.db").exists(), "filtered out");
    let m = fs::metadata(dst.join("data/zeros")).expect("m");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 5678, 0o600));
    let c = fs::metadata(dst.join("data/sub/config.toml")).expect("m");
    assert_eq!(c.mode() & 0o7777, 0o640);
}

/// Every chunk of a local store, decompressed.
fn all_chunk_bytes(store: &Path) -> Vec<Vec<u8>> {
    let mut dctx = zstd::bulk::Decompressor::new().expect("zstd");
    let mut out = Vec::new();
    for (pack, blobs) in packs(store) {
        let data = fs::read(&pack).expect("read pack");
        for b in blobs {
            let frame = &data[b.offset as usize..(b.offset + b.stored_len) as usize];
            let mut chunk = Vec::new();
            btm_chunk::format::pack::open_frame(
                frame,
                &b.hash,
                u64::from(b.raw_len),
                &mut dctx,
                &mut chunk,
            )
            .expect("frame");
            out.push(chunk);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every node family's key files, at the depths their nodes put them, stay
/// out of the store: no chunk holds any of their bytes, while the chain
/// data beside them is stored (the same search finds it), and
/// `--include-secrets` takes them all along.
#[test]
fn every_familys_key_files_stay_out_of_the_store() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("node");
    let keys = [
        "bitcoin/regtest/wallets/w/wallet.dat",
        "bitcoin/regtest/wallets/w/db.log",
        "bitcoin/wallet.dat",
        "bitcoin/.cookie",
        "solana/validator-keypair.json",
        "solana/ledger/vote-account-keypair.json",
        "solana/identity.json",
        "polkadot/chains/polkadot/keystore/6175726100",
        "polkadot/chains/polkadot/network/secret_ed25519",
        "geth/geth/nodekey",
        "geth/geth/jwtsecret",
        "reth/jwt.hex",
        "reth/discovery-secret",
        "nethermind/keystore/jwt-secret",
        "besu/key",
        "teku/validator/key-manager/local/0xabc.json",
        "nimbus/validators/0xabc/keystore.json",
        "lighthouse/wallets/w1/wallet.json",
        "lighthouse/validators/validator_definitions.yml",
        "lighthouse/validators/0xabc/voting-keystore.json",
        "lighthouse/beacon/network/key",
        "lodestar/keystores/0xabc/voting-keystore.json",
        "lodestar/secrets/0xabc",
        "sui/sui.keystore",
        "sui/protocol.key",
        "aptos/private-keys.yaml",
        "aptos/validator-identity.yaml",
        "aptos/secure-data.json",
        "cosmos/config/priv_validator_key.json",
        "cosmos/keyring-file/v.info",
    ];
    let data = [
        "bitcoin/regtest/chainstate/000005.ldb",
        "geth/geth/chaindata/000123.ldb",
        "solana/ledger/rocksdb/000042.sst",
        "polkadot/chains/polkadot/db/full/000007.sst",
    ];
    let write = |rel: &str, seed: u64| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let bytes = random(200, seed);
        fs::write(&p, &bytes).expect("w");
        bytes
    };
    let secrets: Vec<(&str, Vec<u8>)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (*k, write(k, 1000 + i as u64)))
        .collect();
    let kept: Vec<Vec<u8>> = data
        .iter()
        .enumerate()
        .map(|(i, d)| write(d, 2000 + i as u64))
        .collect();
    let store = dir.path().join("store");
    let s = store.to_str().expect("utf8");
    let r = root.to_str().expect("utf8");
    btm(dir.path(), &["backup", r, "-s", s]).ok();
    let chunks = all_chunk_bytes(&store);
    for (key, bytes) in &secrets {
        assert!(
            !chunks.iter().any(|c| contains(c, &bytes[..32])),
            "{key} reached the store"
        );
    }
    for bytes in &kept {
        assert!(
            chunks.iter().any(|c| contains(c, &bytes[..32])),
            "the chain data is stored, and the search finds it"
        );
    }
    btm(
        dir.path(),
        &["backup", r, "-s", s, "-t", "keys", "--include-secrets"],
    )
    .ok();
    let chunks = all_chunk_bytes(&store);
    for (key, bytes) in &secrets {
        assert!(
            chunks.iter().any(|c| contains(c, &bytes[..32])),
            "{key} is stored when asked"
        );
    }
}

/// A CometBFT home's keys never reach the store by default; what
/// was left out is recorded and shown; `--exclude` adds patterns and
/// `--include-secrets` is the one way to take the keys along.
#[test]
fn validator_keys_never_leave_the_machine_by_default() {
    let dir = tempfile::tempdir().expect("tmp");
    let home = dir.path().join("home");
    let key = format!(
        "{{\"priv_key\":{{\"value\":\"{}\"}}}}",
        hex(&random(48, 21))
    );
    let node_key = format!(
        "{{\"priv_key\":{{\"value\":\"{}\"}}}}",
        hex(&random(48, 22))
    );
    let keyring = random(300, 23);
    fs::create_dir_all(home.join("config")).expect("mkdir");
    fs::create_dir_all(home.join("data")).expect("mkdir");
    fs::create_dir_all(home.join("keyring-file")).expect("mkdir");
    fs::write(home.join("config/priv_validator_key.json"), &key).expect("w");
    fs::write(home.join("config/node_key.json"), &node_key).expect("w");
    fs::write(home.join("keyring-file/validator.info"), &keyring).expect("w");
    fs::write(home.join("config/config.toml"), b"moniker = \"v\"\n").expect("w");
    fs::write(
        home.join("data/priv_validator_state.json"),
        b"{\"height\":\"5\"}",
    )
    .expect("w");
    fs::write(home.join("data/app.log"), b"noise").expect("w");
    let store = dir.path().join("store");
    let s = store.to_str().expect("utf8");
    let h = home.to_str().expect("utf8");

    let run = btm(
        dir.path(),
        &["backup", h, "-s", s, "--exclude", "*.log", "--json"],
    );
    let summary = json(run);
    let excluded = summary["excluded"].as_array().expect("excluded").clone();
    let patterns: Vec<&str> = excluded
        .iter()
        .map(|x| x["pattern"].as_str().expect("p"))
        .collect();
    assert!(
        patterns.contains(&"config/priv_validator_key.json"),
        "{summary}"
    );
    assert!(patterns.contains(&"config/node_key.json"), "{summary}");
    assert!(patterns.contains(&"keyring-file/"), "{summary}");
    assert!(patterns.contains(&"*.log"), "{summary}");
    for chunk in all_chunk_bytes(&store) {
        for secret in [key.as_bytes(), node_key.as_bytes(), &keyring[..]] {
            assert!(
                !contains(&chunk, &secret[..32]),
                "a key's bytes reached the store"
            );
        }
    }
    let show = btm(
        dir.path(),
        &[
            "backups",
            "show",
            summary["name"].as_str().expect("n"),
            "-s",
            s,
        ],
    )
    .ok();
    assert!(
        show.contains("excluded: config/priv_validator_key.json (secret: CometBFT validator key"),
        "{show}"
    );
    assert!(
        show.contains("excluded: *.log (--exclude; 1 matched)"),
        "{show}"
    );
    let dst = dir.path().join("dst");
    btm(
        dir.path(),
        &["restore", "latest", dst.to_str().expect("utf8"), "-s", s],
    )
    .ok();
    assert!(!dst.join("config/priv_validator_key.json").exists());
    assert!(!dst.join("keyring-file").exists());
    assert!(!dst.join("data/app.log").exists());
    assert!(dst.join("config/config.toml").exists());

    let opted = json(btm(
        dir.path(),
        &[
            "backup",
            h,
            "-s",
            s,
            "-t",
            "keys",
            "--include-secrets",
            "--json",
        ],
    ));
    assert!(opted.get("excluded").is_none(), "{opted}");
    let chunks = all_chunk_bytes(&store);
    assert!(
        chunks.iter().any(|c| contains(c, &key.as_bytes()[..32])),
        "opted in: the key is stored"
    );
}

/// A restore over a validator whose signing state is ahead of the
/// backup keeps the local file and says so; other files are restored.
#[test]
fn restore_keeps_local_signing_state_that_is_ahead() {
    let dir = tempfile::tempdir().expect("tmp");
    let home = dir.path().join("home");
    fs::create_dir_all(home.join("data")).expect("mkdir");
    fs::write(
        home.join("data/priv_validator_state.json"),
        b"{\"height\":\"100\"}",
    )
    .expect("w");
    fs::write(home.join("data/blocks"), random(100_000, 31)).expect("w");
    let store = dir.path().join("store");
    let s = store.to_str().expect("utf8");
    btm(
        dir.path(),
        &["backup", home.to_str().expect("utf8"), "-s", s],
    )
    .ok();

    let node = dir.path().join("node");
    fs::create_dir_all(node.join("data")).expect("mkdir");
    fs::write(
        node.join("data/priv_validator_state.json"),
        b"{\"height\":\"250\"}",
    )
    .expect("w");
    fs::write(node.join("data/stray"), b"x").expect("w");
    let n = node.to_str().expect("utf8");
    let out = btm(dir.path(), &["restore", "latest", n, "-s", s, "--delete"]).ok();
    assert!(
        out.contains("kept the local validator signing state data/priv_validator_state.json"),
        "{out}"
    );
    assert_eq!(
        fs::read(node.join("data/priv_validator_state.json")).expect("r"),
        b"{\"height\":\"250\"}"
    );
    assert_eq!(
        fs::read(node.join("data/blocks")).expect("r"),
        random(100_000, 31)
    );
    assert!(
        !node.join("data/stray").exists(),
        "--delete still removes the rest"
    );

    // An empty directory gets the backup's copy: there is nothing to keep.
    let fresh = dir.path().join("fresh");
    btm(
        dir.path(),
        &["restore", "latest", fresh.to_str().expect("utf8"), "-s", s],
    )
    .ok();
    assert_eq!(
        fs::read(fresh.join("data/priv_validator_state.json")).expect("r"),
        b"{\"height\":\"100\"}"
    );
    let out = btm(
        dir.path(),
        &["restore", "latest", n, "-s", s, "--overwrite-signing-state"],
    )
    .ok();
    assert!(!out.contains("kept"), "{out}");
    assert_eq!(
        fs::read(node.join("data/priv_validator_state.json")).expect("r"),
        b"{\"height\":\"100\"}"
    );
}

/// `restore --delete` removes only what the backup
/// covers. Key material (left out of every backup by default) and what the
/// backup's `--exclude` patterns left out stay, even inside a directory
/// the backup lacks, and the summary says what was kept and why.
#[test]
fn restore_delete_keeps_the_keys_and_excludes_a_backup_left_out() {
    let dir = tempfile::tempdir().expect("tmp");
    let n = dir.path().join("n");
    fs::create_dir_all(n.join("config")).expect("mkdir");
    fs::create_dir_all(n.join("data")).expect("mkdir");
    fs::write(n.join("config/priv_validator_key.json"), b"K").expect("w");
    fs::write(n.join("config/node_key.json"), b"NK").expect("w");
    fs::write(n.join("x"), b"d").expect("w");
    fs::write(n.join("data/app.log"), b"log").expect("w");
    let store = dir.path().join("store");
    let (s, ns) = (store.to_str().expect("utf8"), n.to_str().expect("utf8"));
    btm(
        dir.path(),
        &["backup", ns, "-s", s, "-t", "v", "--exclude", "*.log"],
    )
    .ok();
    // Since the backup: a stray file, a directory the backup lacks holding
    // a key and other files, and a new log.
    fs::write(n.join("stray"), b"s").expect("w");
    fs::create_dir_all(n.join("old/config")).expect("mkdir");
    fs::create_dir_all(n.join("old/sub")).expect("mkdir");
    fs::write(n.join("old/config/priv_validator_key.json"), b"OK").expect("w");
    fs::write(n.join("old/sub/f"), b"f").expect("w");
    fs::write(n.join("data/new.log"), b"new").expect("w");

    let out = btm(
        dir.path(),
        &["restore", "latest", ns, "-s", s, "-t", "v", "--delete"],
    )
    .ok();
    for (rel, content) in [
        ("config/priv_validator_key.json", &b"K"[..]),
        ("config/node_key.json", b"NK"),
        ("old/config/priv_validator_key.json", b"OK"),
        ("data/app.log", b"log"),
        ("data/new.log", b"new"),
        ("x", b"d"),
    ] {
        assert_eq!(fs::read(n.join(rel)).expect(rel), content, "{rel}: {out}");
    }
    for gone in ["stray", "old/sub"] {
        assert!(!n.join(gone).exists(), "{gone} must go: {out}");
    }
    assert!(out.contains("--delete kept 5 local entries"), "{out}");
    assert!(
        out.contains("kept config/priv_validator_key.json (secret: CometBFT validator key"),
        "{out}"
    );
    assert!(out.contains("kept data/new.log (--exclude)"), "{out}");
    assert!(
        out.contains(", 3 removed"),
        "stray, old/sub/f, old/sub: {out}"
    );
}

/// `restore --delete` removes through descriptors,
/// never by path: a directory of the destination swapped for a symlink
/// while the pass is in it cannot send a removal outside the destination.
#[test]
fn restore_delete_never_follows_a_directory_swapped_for_a_symlink() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("a")).expect("mkdir");
    fs::write(src.join("a/keep"), b"k").expect("w");
    let store = dir.path().join("store");
    let s = store.to_str().expect("utf8");
    btm(
        dir.path(),
        &["backup", src.to_str().expect("utf8"), "-s", s],
    )
    .ok();
    let dst = dir.path().join("dst");
    let d = dst.to_str().expect("utf8");
    btm(dir.path(), &["restore", "latest", d, "-s", s]).ok();
    // Strays for --delete: `a/w`, removed first, then `a/x`, a directory
    // big enough that reading it leaves time for the swap.
    fs::write(dst.join("a/w"), b"w").expect("w");
    fs::create_dir_all(dst.join("a/x")).expect("mkdir");
    for i in 0..20_000 {
        fs::write(dst.join(format!("a/x/{i}")), b"").expect("w");
    }
    let outside = dir.path().join("outside");
    fs::create_dir_all(outside.join("x")).expect("mkdir");
    fs::write(outside.join("x/canary"), b"alive").expect("w");

    let swapper = {
        let (dst, outside) = (dst.clone(), outside.clone());
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            while dst.join("a/w").symlink_metadata().is_ok() {
                assert!(started.elapsed().as_secs() < 60, "a/w was never removed");
                std::hint::spin_loop();
            }
            fs::rename(dst.join("a"), dst.join("a.moved")).expect("move a aside");
            std::os::unix::fs::symlink(&outside, dst.join("a")).expect("symlink");
        })
    };
    let out = btm(dir.path(), &["restore", "latest", d, "-s", s, "--delete"]);
    swapper.join().expect("swapped");
    assert_eq!(
        fs::read(outside.join("x/canary")).expect("the canary outside the destination"),
        b"alive",
        "{}{}",
        out.stdout,
        out.stderr
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A restore never lays one chain over another. A directory restored from
/// a backup of chain A, or a CometBFT home whose genesis.json says A,
/// refuses a backup of chain B with one line, and nothing in it changes;
/// `--allow-other-chain` restores anyway, and the record follows. `latest
/// --chain` picks among the backups of one tag by chain.
#[test]
fn a_restore_refuses_to_lay_one_chain_over_another() {
    let t = Tree::new();
    let other = t.p("other");
    fs::create_dir_all(&other).expect("mkdir");
    fs::write(other.join("state"), random(100_000, 77)).expect("w");
    let (src, oth) = (t.src(), other.display().to_string());
    let src = src.to_str().expect("utf8");
    t.btm(&["backup", src, "-t", "a", "--chain", "net-a"]).ok();
    t.btm(&["backup", &oth, "-t", "b", "--chain", "net-b"]).ok();
    let dst = t.p("dst");
    let d = dst.to_str().expect("utf8");
    t.btm(&["restore", "-t", "a", d]).ok();
    assert_same_tree(&t.src(), &dst);

    let e = t.btm(&["restore", "-t", "b", d]).fails(1);
    for want in [
        "refusing to restore",
        "(chain net-b)",
        "holds chain net-a",
        "restored from",
        "chain id differs",
        "nothing was written",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }
    assert_same_tree(&t.src(), &dst);
    let e = t.btm(&["restore", "-t", "b", d, "--delete"]).fails(1);
    assert!(e.contains("refusing"), "{e}");
    assert_same_tree(&t.src(), &dst);

    t.btm(&["restore", "-t", "b", d, "--delete", "--allow-other-chain"])
        .ok();
    assert_same_tree(&other, &dst);
    let e = t.btm(&["restore", "-t", "a", d]).fails(1);
    assert!(e.contains("holds chain net-b"), "{e}");

    // A CometBFT home says its chain in its genesis.json.
    let home = t.p("home");
    fs::create_dir_all(home.join("config")).expect("mkdir");
    fs::write(
        home.join("config/genesis.json"),
        r#"{"genesis_time":"2024-01-01T00:00:00Z","chain_id":"net-a","app_state":{}}"#,
    )
    .expect("genesis");
    let h = home.to_str().expect("utf8");
    let e = t.btm(&["restore", "-t", "b", h]).fails(1);
    assert!(
        e.contains("genesis.json") && e.contains("holds chain net-a"),
        "{e}"
    );
    assert!(!home.join("state").exists());

    // latest --chain, among the backups of one tag.
    t.btm(&["backup", src, "-t", "mixed", "--chain", "net-a"])
        .ok();
    t.btm(&["backup", &oth, "-t", "mixed", "--chain", "net-b"])
        .ok();
    let pick = t.p("pick");
    let p = pick.to_str().expect("utf8");
    t.btm(&["restore", "-t", "mixed", "--chain", "net-a", p])
        .ok();
    assert_same_tree(&t.src(), &pick);
    let e = t
        .btm(&["restore", "-t", "mixed", "--chain", "net-z", p])
        .fails(1);
    assert!(
        e.contains("no backup with tag 'mixed' of chain net-z"),
        "{e}"
    );
    // backups --chain lists only that chain's.
    let listed = t.btm(&["backups", "--chain", "net-a"]).ok();
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(
        listed
            .lines()
            .all(|l| l.ends_with("--a") || l.ends_with("--mixed")),
        "{listed}"
    );
    let listed = t
        .btm(&["backups", "--chain", "net-b", "-t", "mixed", "--json"])
        .ok();
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["meta"]["chain_id"], "net-b");
    let e = t.btm(&["backup", src, "--chain", "two words"]).fails(2);
    assert!(e.contains("chain id"), "{e}");
}

/// Run `btm ARGS -s STORE` as `uid`:`uid` with supplementary group
/// `group` (as a Kubernetes pod's `runAsUser` and `fsGroup`), its cache
/// in `cache`.
fn btm_as(t: &Tree, uid: u32, group: u32, cache: &Path, args: &[&str]) -> common::Run {
    let store = t.store();
    std::process::Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            format!("--groups={group}"),
            "--".into(),
            env!("CARGO_BIN_EXE_btm").into(),
        ])
        .args(args)
        .args(["-s", &store])
        .env("BTM_CACHE_DIR", cache)
        .env("HOME", cache)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .map(common::Run::from)
        .expect("setpriv runs btm")
}

/// tar's convention: an ordinary user restoring a root-owned backup gets
/// files of its own (and the setgid volume's group, as a pod's `fsGroup`
/// gives), content, modes and times exact, and is told once; a rerun is
/// a no-op; `--same-owner` refuses in one line instead of half-restoring.
#[test]
fn a_restore_by_an_ordinary_user_gives_it_the_files_with_exact_modes_and_times() {
    let t = Tree::new();
    let zeros = t.src().join("data/zeros");
    std::os::unix::fs::lchown(&zeros, Some(1234), Some(5678)).expect("chown");
    fs::set_permissions(&zeros, fs::Permissions::from_mode(0o4750)).expect("chmod");
    t.backup(&[]);
    let (uid, fs_group) = (65534, 4242);
    // Readable by that user: the store and the binary's way to it.
    common::sh("chmod", &["-R", "a+rX", &t.store()]);
    fs::set_permissions(t.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let cache = t.p("cache-of-user");
    let vol = t.p("vol");
    for (d, mode) in [(&cache, 0o700), (&vol, 0o2775)] {
        fs::create_dir(d).expect("mkdir");
        std::os::unix::fs::chown(d, Some(if mode == 0o700 { uid } else { 0 }), Some(fs_group))
            .expect("chown");
        fs::set_permissions(d, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let dst = vol.join("data");
    let dst_s = dst.to_str().expect("utf8");
    let run = btm_as(&t, uid, fs_group, &cache, &["restore", "latest", dst_s]).ok();
    assert_eq!(run.matches("owners not restored").count(), 1, "{run}");
    assert_same_tree(&t.src(), &dst);
    for entry in walk(&dst) {
        let m = fs::symlink_metadata(&entry).expect("m");
        assert_eq!((m.uid(), m.gid()), (uid, fs_group), "{}", entry.display());
    }
    let zeros_mode = fs::metadata(dst.join("data/zeros")).expect("m").mode() & 0o7777;
    assert_eq!(zeros_mode, 0o4750, "the setuid bit is the owner's to set");

    // Again: everything is trusted from the journal's record, nothing read.
    let again = btm_as(
        &t,
        uid,
        fs_group,
        &cache,
        &["restore", "latest", dst_s, "--json"],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(&again).expect("json");
    assert_eq!(v["summary"]["chunks_fetched"], 0, "{again}");
    assert_eq!(v["summary"]["owners"], "restorer", "{again}");
    assert_same_tree(&t.src(), &dst);

    // Asking for owners it cannot give fails in one line, and says why.
    let other = vol.join("other");
    let err = btm_as(
        &t,
        uid,
        fs_group,
        &cache,
        &[
            "restore",
            "latest",
            other.to_str().expect("utf8"),
            "--same-owner",
        ],
    );
    assert_eq!(err.code, 1, "{}", err.stdout);
    let err = err.stderr.lines().last().unwrap_or_default().to_owned();
    assert!(
        err.contains("only root can give files the backup's owners"),
        "{err}"
    );

    // Root restores the owners exactly, as before.
    let as_root = t.p("as-root");
    t.btm(&["restore", "latest", as_root.to_str().expect("utf8")])
        .ok();
    let m = fs::metadata(as_root.join("data/zeros")).expect("m");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 5678, 0o4750));
}

/// `backup --height` records the height; `--rpc-url` asks a node which
/// block it has there and records it, and a node that does not answer is
/// one line and no backup; a height that disagrees with `--meta`, a URL
/// without a height, and an unknown RPC kind are refused before anything
/// is read.
#[test]
fn backup_height_and_chain_identity_are_checked() {
    let t = Tree::new();
    let src = t.src();
    let s = src.to_str().expect("utf8");
    t.backup(&["--height", "120"]);
    let listed = json(t.btm(&["backups", "--json"]));
    assert_eq!(listed[0]["meta"]["height"], 120, "{listed}");
    let e = t
        .btm(&["backup", s, "--height", "5", "--meta", r#"{"height":6}"#])
        .fails(1);
    assert!(e.contains("disagree"), "{e}");
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    let with_rpc = |kind: &str, height: Option<&str>| {
        let mut a = vec!["backup", s, "--rpc-url", &closed, "--rpc-kind", kind];
        if let Some(h) = height {
            a.extend(["--height", h]);
        }
        t.btm(&a)
    };
    let e = with_rpc("bitcoin", Some("5")).fails(1);
    assert!(e.contains("did not say which block it has at 5"), "{e}");
    let e = with_rpc("bitcoin", None).fails(2);
    assert!(e.contains("--height"), "{e}");
    let e = with_rpc("nope", Some("5")).fails(2);
    assert!(e.contains("not an RPC kind"), "{e}");
    let listed = json(t.btm(&["backups", "--json"]));
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
}

/// The inode numbers of `paths` under `root`.
fn inodes(root: &Path, paths: &[&str]) -> Vec<u64> {
    paths
        .iter()
        .map(|p| fs::symlink_metadata(root.join(p)).expect("m").ino())
        .collect()
}

#[test]
fn hard_links_stay_links_like_a_rocksdb_checkpoint() {
    let t = Tree::new();
    // A RocksDB-like database and a checkpoint of it that hard-links its
    // table files; the manifest also has a name outside the backup.
    let db = t.src().join("data/db");
    let ck = t.src().join("data/checkpoint");
    fs::create_dir_all(&db).expect("mkdir");
    fs::create_dir_all(&ck).expect("mkdir");
    for i in 1..=3u64 {
        let name = format!("00000{i}.sst");
        fs::write(db.join(&name), random(700_000 * i as usize, 40 + i)).expect("w");
        fs::hard_link(db.join(&name), ck.join(&name)).expect("link");
    }
    fs::write(db.join("MANIFEST-000004"), b"manifest").expect("w");
    fs::hard_link(db.join("MANIFEST-000004"), t.p("outside-name")).expect("link");
    // Empty: complete before its link is made.
    fs::write(ck.join("LOCK"), b"").expect("w");
    fs::hard_link(ck.join("LOCK"), db.join("LOCK")).expect("link");
    let backup = t.backup(&[]);
    assert_eq!(backup["links"], 4, "{backup}");

    // Shown as links, in a format 3 backup.
    let name = backup["name"].as_str().expect("name");
    let show = t.btm(&["backups", "show", name]).ok();
    assert!(show.contains("format 3"), "{show}");
    assert!(
        show.contains("data/db/000002.sst => data/checkpoint/000002.sst (hard link)"),
        "{show}"
    );

    let dst = t.p("dst");
    let dst_s = dst.to_str().expect("utf8");
    let run = json(t.btm(&["restore", "latest", dst_s, "--json"]));
    assert_eq!(run["summary"]["links"], 4, "{run}");
    assert_same_tree(&t.src(), &dst);
    let pairs = |root: &Path| {
        (1..=3)
            .map(|i| {
                let n = format!("00000{i}.sst");
                let ino = inodes(
                    root,
                    &[&format!("data/db/{n}"), &format!("data/checkpoint/{n}")],
                );
                let m = fs::metadata(root.join(format!("data/db/{n}"))).expect("m");
                (ino[0] == ino[1], m.nlink())
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(pairs(&dst), vec![(true, 2); 3], "one inode per table file");
    let manifest = fs::metadata(dst.join("data/db/MANIFEST-000004")).expect("m");
    assert_eq!(manifest.nlink(), 1, "its other name is not in the backup");

    // Linking a file changes its change time: the record of a target
    // completed before its link was made is stamped again, so the next
    // restore trusts it instead of reading every table file again.
    let same = json(t.btm(&["restore", "latest", dst_s, "--json"]));
    assert_eq!(
        same["summary"]["files_known"], same["summary"]["files"],
        "{same}"
    );
    assert_eq!(same["summary"]["bytes_verified"], 0, "{same}");

    // Into a tree where they are separate files (a restore before links
    // were kept), and one link replaced by other bytes: made links again,
    // and the bytes are the backup's.
    fs::remove_file(dst.join("data/checkpoint/000001.sst")).expect("rm");
    fs::copy(
        dst.join("data/db/000001.sst"),
        dst.join("data/checkpoint/000001.sst"),
    )
    .expect("copy");
    fs::remove_file(dst.join("data/db/000003.sst")).expect("rm");
    fs::write(dst.join("data/db/000003.sst"), b"other").expect("w");
    let again = json(t.btm(&["restore", "latest", dst_s, "--json"]));
    assert_same_tree(&t.src(), &dst);
    assert_eq!(pairs(&dst), vec![(true, 2); 3], "{again}");
    assert_eq!(
        again["summary"]["chunks_fetched"], 0,
        "nothing to fetch: {again}"
    );

    // A filter that selects a link but not its target stops, naming both.
    let err = t.btm(&[
        "restore",
        "latest",
        t.p("part").to_str().expect("utf8"),
        "--filter",
        "^data/db/",
    ]);
    assert_eq!(err.code, 1, "{}", err.stdout);
    let last = err.stderr.lines().last().unwrap_or_default().to_owned();
    assert!(
        last.contains("data/db/000001.sst") && last.contains("data/checkpoint/000001.sst"),
        "{last}"
    );

    // Unchanged links are reused by the next backup, and a new name of a
    // file joins its group.
    fs::hard_link(db.join("000001.sst"), db.join("000001.sst.bak")).expect("link");
    let next = t.backup(&[]);
    assert_eq!(next["links"], 5, "{next}");
    let dst2 = t.p("dst2");
    t.btm(&["restore", "latest", dst2.to_str().expect("utf8")])
        .ok();
    let group = inodes(
        &dst2,
        &[
            "data/checkpoint/000001.sst",
            "data/db/000001.sst",
            "data/db/000001.sst.bak",
        ],
    );
    assert!(group.windows(2).all(|w| w[0] == w[1]), "{group:?}");
}

#[test]
fn new_files_under_a_strict_umask_still_get_exact_modes() {
    // New entries are created with their modes and checked once, in the
    // fstat the journal needs: a umask that took bits away is seen there.
    let t = Tree::new();
    fs::set_permissions(
        t.src().join("data/blocks.log"),
        fs::Permissions::from_mode(0o4755),
    )
    .expect("chmod");
    t.backup(&[]);
    let dst = t.p("dst");
    let store = t.store();
    let cmd = common::btm_cmd(
        t.dir.path(),
        &[
            "restore",
            "latest",
            dst.to_str().expect("utf8"),
            "-s",
            &store,
        ],
    );
    let mut sh = std::process::Command::new("sh");
    sh.args(["-c", "umask 077 && exec \"$0\" \"$@\""])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let out = sh.output().expect("sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&t.src(), &dst);
}
