//! The sparse chunk engine against a local store: byte- and hole-exact
//! round trips, incremental and append-only backups, in-place restores over
//! damaged trees, and every broken or hostile input failing loudly.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use btm::chunk::index::{Entry, EntryKind, Index, IndexName, FORMAT_VERSION};
use btm::store::{LocalStore, Store};
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
    assert_eq!(show["format"], FORMAT_VERSION);
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

#[test]
fn corrupt_and_missing_chunks_fail_loudly() {
    let t = Tree::new();
    t.backup(&[]);
    let chunk_files: Vec<_> = walk(&t.p("store/chunks"))
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    let victim = &chunk_files[0];
    let hash = victim
        .file_name()
        .expect("name")
        .to_str()
        .expect("utf8")
        .to_owned();
    fs::write(victim, b"not zstd").expect("corrupt");
    let dst = t.p("dst");
    let err = t
        .btm(&["restore", "latest", dst.to_str().expect("utf8")])
        .fails(1);
    assert!(err.contains(&hash) && err.contains("file data/"), "{err}");
    let err = t.btm(&["check", "--read-data"]).fails(1);
    assert!(err.contains("1 problem"), "{err}");

    fs::remove_file(victim).expect("rm");
    let err = t
        .btm(&["restore", "latest", t.p("dst2").to_str().expect("utf8")])
        .fails(1);
    assert!(err.contains(&hash) && err.contains("missing"), "{err}");
    let out = t.btm(&["check"]);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("is missing"), "{}", out.stdout);
}

fn put_index(store: &LocalStore, tag: &str, entries: Vec<Entry>) -> String {
    let name = IndexName::new(chrono::Utc::now(), tag).to_string();
    let idx = Index {
        format: FORMAT_VERSION,
        chunk_size: MB,
        created: chrono::Utc::now(),
        tag: tag.into(),
        meta: serde_json::Map::new(),
        entries,
    };
    store
        .put_index(&name, &idx.encode().expect("encode"))
        .expect("put");
    name
}

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
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

#[test]
fn hostile_indexes_write_nothing_outside() {
    let t = Tree::new();
    let store = LocalStore::open(&t.store()).expect("store");
    let outside = t.p("outside");
    fs::create_dir(&outside).expect("mkdir");
    let empty_file = || EntryKind::File {
        size: 0,
        chunks: vec![],
    };
    let cases = vec![
        vec![entry("../escape", empty_file())],
        vec![entry("/etc/btm-pwned", empty_file())],
        vec![entry("a/../../escape", empty_file())],
        vec![
            entry(
                "link",
                EntryKind::Symlink {
                    target: outside.display().to_string(),
                },
            ),
            entry("link/pwned", empty_file()),
        ],
        vec![entry(
            "big",
            EntryKind::File {
                size: 10,
                chunks: vec![],
            },
        )],
    ];
    for entries in cases {
        let name = put_index(&store, "evil", entries);
        let dst = t.p("dst");
        let err = t
            .btm(&["restore", &name, dst.to_str().expect("utf8")])
            .fails(1);
        assert!(err.contains("hostile") || err.contains("symlink"), "{err}");
        let _ = fs::remove_dir_all(&dst);
    }
    assert_eq!(
        fs::read_dir(&outside).expect("ls").count(),
        0,
        "something escaped"
    );
    assert!(!t.p("escape").exists() && !Path::new("/etc/btm-pwned").exists());
}

#[test]
fn a_failing_store_leaves_no_index() {
    let t = Tree::new();
    let flaky = common::FaultyStore::new(Path::new(&t.store()), 2, i64::MAX);
    let mut opts = btm::chunk::backup::BackupOptions::new("prod");
    opts.chunk_size = MB;
    let err = btm::chunk::backup::backup(&flaky, &t.src(), &opts).expect_err("must fail");
    assert!(err.to_string().contains("connection reset"), "{err}");
    assert!(
        flaky.list_indexes().expect("list").is_empty(),
        "an index was written for a failed backup"
    );
    // The chunks that made it are reused by the next, successful backup.
    let s = t.backup(&["-t", "prod"]);
    assert!(s["chunks_reused"].as_u64().expect("n") >= 2, "{s}");
    json(t.btm(&["check", "--json"]));
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
    assert_eq!(show["meta"]["height"], 200);
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
