//! Published stores (`btm publish`, docs/publishing.md) read the way
//! strangers read them: Debian's nginx serves a store directory, behind a
//! proxy that adds 20 ms to every request, and `btm` reads it by URL with
//! no listing and no credentials.
//!
//! - restore, an incremental restore over an older copy (only what
//!   differs is fetched; local keys and signing state stay),
//!   `check --read-data`, `verify` and a live restore over `http://`;
//! - a tampered catalog, head, tree segment, pack index or chunk is
//!   refused with one line naming it, and an unsigned head or one signed
//!   by another key is refused under `--trust`; the target is left as it
//!   was (a chunk: its bytes are never written);
//! - anonymous bucket reads: s3s-fs, the only local S3 server here,
//!   refuses every unsigned request ("Signature is required"), so the test
//!   shows that `--no-sign-request` sends none of the credentials in the
//!   environment, and the HTTP path carries the rest;
//! - writes to a published store by URL are refused with one line.
//!
//! Needs root, /dev/fuse, nginx and s3s-fs (scripts/test.sh installs
//! them). Fails, never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use common::http_faults::FaultProxy;
use common::{btm, free_port, noise, FakeRpc, Run};

/// nginx serving `root` on a free loopback port, stopped by PID on drop.
struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn serve(root: &Path) -> Nginx {
        let dir = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let d = dir.path().display().to_string();
        // The layout docs/publishing.md recommends: everything cached
        // forever but the catalog.
        let conf = format!(
            "daemon off;\nmaster_process off;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n    root {root};\n    autoindex off;\n\
                 location = /catalog {{ add_header Cache-Control \"no-cache\"; }}\n\
                 location / {{ add_header Cache-Control \"public, max-age=31536000, immutable\"; }}\n  }}\n}}\n",
            root = root.display()
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).expect("conf");
        let child = Command::new("/usr/sbin/nginx")
            .args(["-c", &format!("{d}/nginx.conf"), "-p", &d.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (scripts/test.sh installs it)");
        // Owned from here: stopped and reaped on drop, panics included.
        let nginx = Nginx {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return nginx;
            }
            sleep(Duration::from_millis(50));
        }
        panic!(
            "nginx did not listen; see {}/error.log",
            nginx._dir.path().display()
        );
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node-shaped tree: a database rewritten in place, small files, a
/// block log, the validator's signing state and key.
fn node(dir: &Path, version: u64) {
    for d in ["data/db", "data/blocks", "config"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    for i in 0..20u64 {
        // One file in ten changes between versions.
        let seed = if i % 10 == 0 { i + 1000 * version } else { i };
        std::fs::write(
            dir.join(format!("data/db/{i:03}.sst")),
            noise(seed, 200_000),
        )
        .expect("w");
    }
    let mut log = noise(7, 3 << 20);
    log.extend(noise(8 + version, (version as usize) << 18));
    std::fs::write(dir.join("data/blocks/log"), log).expect("w");
    std::fs::write(
        dir.join("data/priv_validator_state.json"),
        format!(
            "{{\"height\":\"{}\",\"round\":0,\"step\":3}}",
            100 * version
        ),
    )
    .expect("w");
    std::fs::write(
        dir.join("config/priv_validator_key.json"),
        b"{\"secret\":\"publisher's\"}",
    )
    .expect("w");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// Every file under `dir` with its bytes, for "left untouched".
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

struct World {
    scratch: tempfile::TempDir,
    store: PathBuf,
    key: PathBuf,
    public: String,
    _nginx: Nginx,
    proxy: FaultProxy,
}

impl World {
    fn new() -> World {
        let scratch = tempfile::tempdir().expect("tmp");
        let store = scratch.path().join("store");
        let key = scratch.path().join("publisher.key");
        let out = btm(scratch.path(), &["key", "generate", s(&key)]).ok();
        let public = out.trim().lines().last().expect("last line").to_owned();
        assert!(public.starts_with("ed25519:"), "{out}");
        std::fs::create_dir(&store).expect("store");
        let nginx = Nginx::serve(&store);
        let proxy = FaultProxy::start_far(nginx.port, 0, Duration::from_millis(20));
        World {
            scratch,
            store,
            key,
            public,
            _nginx: nginx,
            proxy,
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    fn url(&self) -> String {
        format!("{}/", self.proxy.url())
    }

    fn btm(&self, args: &[&str]) -> Run {
        btm(self.scratch.path(), args)
    }

    /// Back up `src` as a node at `height`, then publish.
    fn export(&self, src: &Path, height: u64) {
        let meta = format!(
            "{{\"height\":{height},\"chain\":{{\"kind\":\"ethereum\",\"height\":{height},\"block_hash\":\"0x{:064x}\",\"state_hash\":\"0x{:064x}\"}}}}",
            height * 31,
            height * 17
        );
        self.btm(&[
            "backup",
            s(src),
            "-s",
            s(&self.store),
            "-t",
            "node",
            "--meta",
            &meta,
        ])
        .ok();
        let out = self
            .btm(&[
                "publish",
                "-s",
                s(&self.store),
                "--signing-key",
                s(&self.key),
            ])
            .ok();
        assert!(out.contains(&self.public), "{out}");
    }

    /// `btm ARGS -s URL --trust KEY`.
    fn read(&self, args: &[&str]) -> Run {
        let url = self.url();
        let mut all = args.to_vec();
        all.extend(["-s", &url, "--trust", &self.public]);
        self.btm(&all)
    }
}

/// A fake Ethereum node whose block 200 has the hashes `export` records
/// (with `fork`, another state root).
fn eth_node(fork: bool) -> FakeRpc {
    FakeRpc::start_with_body(move |_, body| {
        let result = if body.contains("eth_blockNumber") {
            "\"0xc8\"".to_owned()
        } else {
            format!(
                "{{\"number\":\"0xc8\",\"hash\":\"0x{:064x}\",\"stateRoot\":\"0x{:064x}\"}}",
                200 * 31,
                200 * 17 + u64::from(fork)
            )
        };
        (
            200,
            format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{result}}}"),
        )
    })
}

#[test]
fn restores_incrementally_checks_and_verifies_over_http() {
    let w = World::new();
    let (v1, v2) = (w.dir("v1"), w.dir("v2"));
    node(&v1, 1);
    node(&v2, 2);
    w.export(&v1, 100);

    // Strangers list it with no key: it works, and they are warned.
    let listed = w.btm(&["backups", "-s", &w.url()]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert!(listed.stdout.contains("--node"), "{}", listed.stdout);
    assert!(
        listed.stderr.contains("unauthenticated"),
        "{}",
        listed.stderr
    );
    // With the key, no warning.
    let trusted = w.read(&["backups"]);
    assert_eq!(trusted.code, 0, "{}", trusted.stderr);
    assert!(
        !trusted.stderr.contains("unauthenticated"),
        "{}",
        trusted.stderr
    );

    // A new node from nothing.
    let target = w.dir("node");
    w.read(&["restore", "latest", s(&target), "-t", "node"])
        .ok();
    // Key material is never exported; everything else is the snapshot.
    assert!(!target.join("config/priv_validator_key.json").exists());
    std::fs::write(
        target.join("config/priv_validator_key.json"),
        b"{\"secret\":\"mine\"}",
    )
    .expect("w");

    // The publisher moves on; the node, a version behind, catches up and
    // fetches only what differs: 2 of 20 database files and the log's
    // tail, not the 7 MiB of the whole tree.
    w.export(&v2, 200);
    // The node's own signing state is newer than the snapshot's.
    std::fs::write(
        target.join("data/priv_validator_state.json"),
        b"{\"height\":\"250\",\"round\":0,\"step\":3}",
    )
    .expect("w");
    let out = w
        .read(&["restore", "latest", s(&target), "-t", "node", "--json"])
        .ok();
    let summary: serde_json::Value = serde_json::from_str(&out).expect("json");
    let fetched = summary["summary"]["bytes_downloaded"]
        .as_u64()
        .expect("bytes_downloaded");
    assert!(
        fetched > 0 && fetched < 1_500_000,
        "fetched {fetched} bytes: {out}"
    );
    assert_eq!(
        std::fs::read(target.join("config/priv_validator_key.json")).expect("key"),
        b"{\"secret\":\"mine\"}",
        "the node's own key stays"
    );
    assert_eq!(
        std::fs::read(target.join("data/priv_validator_state.json")).expect("state"),
        b"{\"height\":\"250\",\"round\":0,\"step\":3}",
        "the node's signing state stays"
    );
    for f in [
        "data/blocks/log",
        "data/db/000.sst",
        "data/db/010.sst",
        "data/db/005.sst",
    ] {
        assert_eq!(
            std::fs::read(target.join(f)).expect("r"),
            std::fs::read(v2.join(f)).expect("r"),
            "{f}"
        );
    }

    // check --read-data reads every pack over HTTP.
    let check = w.read(&["check", "--read-data"]).ok();
    assert!(check.contains(" verified; 0 problems"), "{check}");

    // verify: the chain identity the publisher signed, against the node.
    let rpc = eth_node(false);
    let ok = w
        .read(&["verify", "latest", "-t", "node", "--rpc-url", &rpc.url()])
        .ok();
    assert!(ok.starts_with("verified: "), "{ok}");
    let fork = eth_node(true);
    let e = w
        .read(&["verify", "latest", "-t", "node", "--rpc-url", &fork.url()])
        .fails(1);
    assert!(e.contains("NOT verified"), "{e}");

    // Writing through a URL is refused with one line.
    let e = w.btm(&["forget", "-s", &w.url(), "whatever"]).fails(1);
    assert!(e.contains("read-only"), "{e}");
    let e = w.btm(&["backup", s(&v1), "-s", &w.url()]).fails(1);
    assert!(e.contains("read-only"), "{e}");
    let e = w
        .btm(&["publish", "-s", &w.url(), "--signing-key", s(&w.key)])
        .fails(1);
    assert!(e.contains("read-only"), "{e}");
}

/// Flip one byte of `file` at `at`; returns the original bytes.
fn tamper(file: &Path, at: usize) -> Vec<u8> {
    let orig = std::fs::read(file).expect("read");
    let mut bad = orig.clone();
    let at = at.min(bad.len() - 1);
    bad[at] ^= 0x40;
    std::fs::write(file, bad).expect("write");
    orig
}

/// Files under `dir` (relative), recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    snapshot(dir).into_iter().map(|(p, _)| p).collect()
}

#[test]
fn tampered_objects_and_untrusted_signers_are_refused_before_anything_is_written() {
    let w = World::new();
    let (v1, v2) = (w.dir("v1"), w.dir("v2"));
    node(&v1, 1);
    node(&v2, 2);
    w.export(&v1, 100);
    let target = w.dir("node");
    w.read(&["restore", "latest", s(&target), "-t", "node"])
        .ok();
    let before_v2: std::collections::HashSet<PathBuf> = files(&w.store).into_iter().collect();
    w.export(&v2, 200);
    let new = |dir: &str| -> PathBuf {
        files(&w.store.join(dir))
            .into_iter()
            .find(|p| !before_v2.contains(p))
            .unwrap_or_else(|| panic!("no new object under {dir}"))
    };
    let untouched = snapshot(&target);
    let mut attempt = 0;
    let mut refused = |what: &str| -> String {
        // A fresh metadata cache each time: nothing read before hides the
        // tampered object.
        attempt += 1;
        let cache = w.dir(&format!("cache{attempt}"));
        let e = w
            .read(&[
                "restore",
                "latest",
                s(&target),
                "-t",
                "node",
                "--cache",
                s(&cache),
            ])
            .fails(1);
        assert!(e.contains(what), "expected {what:?} in: {e}");
        e
    };

    // The catalog: one height changed after signing.
    let catalog = w.store.join("catalog");
    let signed = std::fs::read(&catalog).expect("catalog");
    let text = String::from_utf8(signed.clone()).expect("utf8");
    std::fs::write(&catalog, text.replace("\"height\":200", "\"height\":201")).expect("w");
    let e = refused("catalog signature does not verify");
    assert!(e.contains("refusing the catalog of"), "{e}");
    std::fs::write(&catalog, &signed).expect("w");
    assert_eq!(snapshot(&target), untouched);

    // The head, a tree segment, a pack index: each named.
    let head = new("indexes");
    let name = head
        .file_name()
        .expect("name")
        .to_str()
        .expect("utf8")
        .to_owned();
    let orig = tamper(&head, 20);
    refused(&format!("refusing head {name}"));
    std::fs::write(&head, orig).expect("w");
    assert_eq!(snapshot(&target), untouched);

    let tree = new("trees");
    let orig = tamper(&tree, 30);
    refused(&format!(
        "tree segment {}: content does not match its name",
        tree.file_name().expect("n").to_str().expect("utf8")
    ));
    std::fs::write(&tree, orig).expect("w");
    assert_eq!(snapshot(&target), untouched);

    let packidx = new("packidx");
    let orig = tamper(&packidx, 30);
    refused(&format!(
        "pack index {}: content does not match its name",
        packidx.file_name().expect("n").to_str().expect("utf8")
    ));
    std::fs::write(&packidx, orig).expect("w");
    assert_eq!(snapshot(&target), untouched);

    // An unsigned head, and one signed by another key, inside a catalog
    // the trusted key signed; then a whole catalog another key signed.
    let key = btm_chunk::public::SigningKey::load(&w.key).expect("key");
    let other = btm_chunk::public::SigningKey::generate().expect("key");
    let (mut c, _) = btm_chunk::public::Catalog::decode(&signed, &[]).expect("catalog");
    let last = c.heads.len() - 1;
    c.heads[last].sig = String::new();
    std::fs::write(&catalog, c.encode(&key)).expect("w");
    refused(&format!("head {name} is not signed by the catalog's key"));
    c.heads[last].sig = other.sign(&btm_chunk::public::catalog::head_message(
        &name,
        &c.heads[last].blake3,
    ));
    std::fs::write(&catalog, c.encode(&key)).expect("w");
    refused(&format!("head {name} is not signed by the catalog's key"));
    // A stranger's whole republication: every signature theirs.
    let (mut c, _) = btm_chunk::public::Catalog::decode(&signed, &[]).expect("catalog");
    for h in &mut c.heads {
        h.sig = other.sign(&btm_chunk::public::catalog::head_message(
            &h.name, &h.blake3,
        ));
    }
    std::fs::write(&catalog, c.encode(&other)).expect("w");
    refused(&format!(
        "catalog is signed by {}, which is not a trusted key",
        other.public()
    ));
    // Without --trust, the same stranger's catalog reads, with a warning.
    let listed = w.btm(&["backups", "-s", &w.url()]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert!(
        listed.stderr.contains("unauthenticated"),
        "{}",
        listed.stderr
    );
    std::fs::write(&catalog, &signed).expect("w");
    assert_eq!(snapshot(&target), untouched);

    // A chunk: a byte inside a new pack. The restore stops at it, naming
    // the file and offset; no byte of the target is ever anything but the
    // old copy's, the signed snapshot's, or the zeros of a file extended
    // to its new length and not yet filled.
    let pack = new("packs");
    let orig = tamper(&pack, 4096);
    let e = refused("chunk");
    assert!(e.contains("corrupt") || e.contains("does not match"), "{e}");
    std::fs::write(&pack, orig).expect("w");
    for (path, bytes) in snapshot(&target) {
        let rel = path.strip_prefix(&target).expect("rel");
        if rel.starts_with(".btm-restore") || rel == Path::new(".btm-restore") {
            continue;
        }
        let old = std::fs::read(v1.join(rel)).unwrap_or_default();
        let new = std::fs::read(v2.join(rel)).unwrap_or_default();
        for (at, b) in bytes.iter().enumerate() {
            let ok = *b == 0 || old.get(at) == Some(b) || new.get(at) == Some(b);
            assert!(ok, "{} at {at}: a byte from neither copy", rel.display());
        }
    }
    // Fixed, the same command finishes the job.
    w.read(&["restore", "latest", s(&target), "-t", "node"])
        .ok();
    assert_eq!(
        std::fs::read(target.join("data/blocks/log")).expect("r"),
        std::fs::read(v2.join("data/blocks/log")).expect("r")
    );
}

#[test]
fn anonymous_bucket_reads_send_no_credentials() {
    let scratch = tempfile::tempdir().expect("tmp");
    let src = scratch.path().join("src");
    node(&src, 1);
    let s3 = common::S3::start(&["snapshots"]);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let key = scratch.path().join("k");
    btm(scratch.path(), &["key", "generate", s(&key)]).ok();
    let url = "s3://snapshots/chain";
    common::btm_env_ok(
        scratch.path(),
        &["backup", s(&src), "-s", url, "-t", "node"],
        &env,
    );
    common::btm_env_ok(
        scratch.path(),
        &["publish", "-s", url, "--signing-key", s(&key)],
        &env,
    );
    // s3s-fs refuses unsigned requests: the refusal proves that the
    // credentials in the environment were not used.
    let e = common::btm_env(
        scratch.path(),
        &[
            "restore",
            "latest",
            s(&scratch.path().join("dst")),
            "-t",
            "node",
            "-s",
            url,
            "--no-sign-request",
        ],
        &env,
    )
    .fails(1);
    assert!(e.contains("Signature is required"), "{e}");
    assert!(e.contains("does the bucket allow anonymous reads?"), "{e}");
    assert!(!scratch.path().join("dst").exists());
    // And an anonymous store is read-only.
    let e = common::btm_env(
        scratch.path(),
        &["gc", "-s", url, "--no-sign-request"],
        &env,
    )
    .fails(1);
    assert!(e.contains("read-only"), "{e}");
}

/// `btm restore --live` serves a published store by URL, checked as any
/// other read of it, and `btm live finish` leaves the plain tree.
#[test]
fn a_live_restore_serves_a_published_store() {
    let w = World::new();
    let src = w.dir("v1");
    node(&src, 1);
    w.export(&src, 100);
    // FUSE and its marks want a disk file system, which /tmp may not be.
    std::fs::create_dir_all("/var/tmp/btm-live-tests").expect("scratch parent");
    let scratch = tempfile::tempdir_in("/var/tmp/btm-live-tests").expect("scratch");
    let live = scratch.path().join("node");
    let url = w.url();
    let mut child = common::btm_cmd(
        w.scratch.path(),
        &[
            "restore",
            "--live",
            "latest",
            s(&live),
            "-t",
            "node",
            "-s",
            &url,
            "--trust",
            &w.public,
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("btm restore --live");
    let err = child.stderr.take().expect("stderr");
    // Killed, and its mount cleared, however the test ends.
    let mut server = LiveServer {
        child,
        dir: live.clone(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(err)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let ready = rx
        .iter()
        .find(|l| l.starts_with("ready: "))
        .expect("the live restore says it is ready");
    assert!(ready.contains("--node"), "{ready}");
    // Read through the mount while it hydrates.
    assert_eq!(
        std::fs::read(live.join("data/blocks/log")).expect("read through the mount"),
        std::fs::read(src.join("data/blocks/log")).expect("source")
    );
    let finish = w.btm(&["live", "finish", s(&live)]);
    let status = server.child.wait().expect("server exits");
    assert_eq!(finish.code, 0, "{}", finish.stderr);
    assert!(status.success(), "{status:?}");
    for f in [
        "data/db/000.sst",
        "data/db/019.sst",
        "data/priv_validator_state.json",
    ] {
        assert_eq!(
            std::fs::read(live.join(f)).expect("r"),
            std::fs::read(src.join(f)).expect("r"),
            "{f}"
        );
    }
    assert!(
        !live.join("config/priv_validator_key.json").exists(),
        "keys are never published"
    );
}

/// A `btm restore --live` server, killed and its mount cleared on drop.
struct LiveServer {
    child: Child,
    dir: PathBuf,
}

impl Drop for LiveServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Freshness, over a real web server: a catalog older than one a reader
/// already accepted (the store swapped for an older signed copy of
/// itself) is refused, as is one past the expiry its publisher signed in,
/// or one older than `--max-age`; each in one line, with nothing written.
#[test]
fn old_expired_and_too_old_catalogs_are_refused() {
    let w = World::new();
    let src = w.dir("src");
    node(&src, 1);
    w.export(&src, 100);
    let old = std::fs::read(w.store.join("catalog")).expect("catalog");
    let dst = w.dir("dst");
    w.read(&["backups"]).ok();
    node(&src, 2);
    w.export(&src, 200);
    w.read(&["backups"]).ok();

    // The web server now serves the older copy: still validly signed.
    std::fs::write(w.store.join("catalog"), &old).expect("roll back");
    let e = w
        .read(&["restore", "latest", s(&dst), "-t", "node"])
        .fails(1);
    assert!(e.contains("older than the one already seen"), "{e}");
    assert!(!dst.exists(), "something was written");

    // An expiry signed in: read before it, refused after.
    let publish = |extra: &[&str]| {
        let mut args = vec!["publish", "-s", s(&w.store), "--signing-key", s(&w.key)];
        args.extend(extra);
        w.btm(&args).ok();
    };
    publish(&["--expires", "2s"]);
    w.read(&["backups"]).ok();
    std::thread::sleep(Duration::from_millis(2100));
    let e = w
        .read(&["restore", "latest", s(&dst), "-t", "node"])
        .fails(1);
    assert!(e.contains("expired at"), "{e}");
    assert!(!dst.exists(), "something was written");
    // Renewed, it reads again.
    publish(&["--expires", "1h"]);
    w.read(&["backups"]).ok();

    // --max-age: the catalog is a second old at least.
    std::thread::sleep(Duration::from_millis(1100));
    let e = w.read(&["backups", "--max-age", "1s"]).fails(1);
    assert!(e.contains("older than --max-age 1s"), "{e}");
    w.read(&["backups", "--max-age", "1h"]).ok();
}

/// A node a week behind, its page cache dropped: the restore knows from
/// its record what each file of the last restore still holds, reads none
/// of the unchanged ones, fetches only what changed, and still catches a
/// file changed in place at the same size since.
#[test]
fn a_week_behind_from_a_cold_cache_reads_only_what_changed() {
    let w = World::new();
    let src = w.dir("src");
    node(&src, 1);
    w.export(&src, 100);
    let (dst, cache) = (w.dir("dst"), w.dir("cache"));
    let restore = || {
        let json = w
            .read(&[
                "restore",
                "latest",
                s(&dst),
                "-t",
                "node",
                "--delete",
                "--json",
                "--cache",
                s(&cache),
            ])
            .ok();
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        v["summary"].clone()
    };
    let first = restore();
    assert_eq!(first["files_known"], 0, "{first}");
    node(&src, 2);
    w.export(&src, 200);
    // Changed here since, in place and at the same size.
    let local = dst.join("data/db/005.sst");
    let mut bytes = std::fs::read(&local).expect("read");
    bytes[10] ^= 0xff;
    std::fs::write(&local, &bytes).expect("write");
    std::process::Command::new("sync").status().expect("sync");
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (root)");
    let second = restore();
    let mut want = snapshot(&src);
    want.retain(|(p, _)| {
        !p.ends_with("config/priv_validator_key.json") && !p.ends_with("priv_validator_state.json")
    });
    let mut got = snapshot(&dst);
    got.retain(|(p, _)| !p.ends_with("priv_validator_state.json"));
    assert_eq!(want.len(), got.len());
    for ((a, x), (_, y)) in want.iter().zip(got.iter()) {
        assert!(x == y, "{} differs", a.display());
    }
    // Every file but the one changed here (and the signing state, kept
    // unopened) is known; only it is read.
    let files = second["files"].as_u64().expect("files");
    assert_eq!(second["files_known"].as_u64(), Some(files - 2), "{second}");
    assert!(
        second["bytes_verified"].as_u64() <= Some(200_000),
        "{second}"
    );
    assert!(
        second["bytes_downloaded"].as_u64() < Some(2_000_000),
        "{second}"
    );
}

/// One store served three ways by nginx: through a proxy that flips every
/// byte of pack answers (`-s`), one that serves a pack read and then
/// stalls, and a good one. The restore draws on all three, sets the first
/// two aside for the rest of the run, and is exact; the summary names
/// them. A mirror of another store (another key) is set aside at once;
/// a mirror list signed into the catalog is used without `--mirror`.
#[test]
fn a_restore_from_three_mirrors_sets_aside_the_bad_and_the_stalled() {
    use common::http_faults::{Fault, Rule};
    let w = World::new();
    let src = w.dir("src");
    node(&src, 1);
    // Small packs: many reads to spread.
    w.btm(&[
        "backup",
        s(&src),
        "-s",
        s(&w.store),
        "-t",
        "node",
        "--pack-size",
        "1MiB",
    ])
    .ok();
    w.btm(&["publish", "-s", s(&w.store), "--signing-key", s(&w.key)])
        .ok();
    let port = w._nginx.port;
    let flipping = FaultProxy::start_far(port, 0, Duration::from_millis(5));
    flipping.add(Rule {
        method: "GET",
        path: "/packs/",
        fault: Fault::Flip,
        times: u32::MAX,
    });
    let stalling = FaultProxy::start_far(port, 0, Duration::from_millis(5));
    stalling.add(Rule {
        method: "GET",
        path: "/packs/",
        fault: Fault::Pass,
        times: 1,
    });
    let stall = Fault::Stall(Duration::from_secs(30));
    stalling.add(Rule {
        method: "GET",
        path: "/packs/",
        fault: stall,
        times: u32::MAX,
    });
    let dst = w.dir("dst");
    let (bad, slow, good) = (flipping.url(), stalling.url(), w.url());
    let args = [
        "restore",
        "latest",
        s(&dst),
        "-t",
        "node",
        "-s",
        &bad,
        "--mirror",
        &slow,
        "--mirror",
        &good,
        "--trust",
        &w.public,
    ];
    let env = [("BTM_STORE_TIMEOUT", "2s")];
    let out = common::btm_env_ok(w.scratch.path(), &args, &env);
    // Everything but key material, which is never exported.
    let mut want = snapshot(&src);
    want.retain(|(p, _)| !p.ends_with("config/priv_validator_key.json"));
    assert_eq!(snapshot(&dst).len(), want.len());
    for ((a, x), (b, y)) in want.iter().zip(snapshot(&dst).iter()) {
        assert_eq!(a.strip_prefix(&src).ok(), b.strip_prefix(&dst).ok());
        assert!(x == y, "{} differs", a.display());
    }
    assert!(flipping.injected().iter().any(|l| l.starts_with("Flip")));
    assert!(
        stalling.injected().iter().any(|l| l.starts_with("Stall")),
        "{:?}",
        stalling.injected()
    );
    let aside = |url: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("mirror {url}")))
            .unwrap_or_else(|| panic!("{url} not in {out}"))
            .to_owned()
    };
    assert!(
        aside(&bad).contains("set aside") && aside(&bad).contains("do not match their hash"),
        "{out}"
    );
    assert!(
        aside(&slow).contains("set aside") && aside(&slow).contains("did not answer"),
        "{out}"
    );
    assert!(!aside(&good).contains("set aside"), "{out}");

    // Another store (another key) as a mirror: set aside at once.
    let other = w.dir("other");
    let other_key = w.dir("other.key");
    w.btm(&["key", "generate", s(&other_key)]).ok();
    w.btm(&[
        "backup",
        s(&src),
        "-s",
        s(&other),
        "-t",
        "node",
        "--publish",
        "--signing-key",
        s(&other_key),
    ])
    .ok();
    let dst2 = w.dir("dst2");
    let other_url = other.display().to_string();
    let out = w
        .read(&[
            "restore",
            "latest",
            s(&dst2),
            "-t",
            "node",
            "--mirror",
            &other_url,
        ])
        .ok();
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("mirror {other_url} set aside")))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("not a trusted key"), "{out}");

    // A mirror list signed into the catalog: used without --mirror.
    let bad_mirror = format!("{bad}/");
    w.btm(&[
        "publish",
        "-s",
        s(&w.store),
        "--signing-key",
        s(&w.key),
        "--mirror-list",
        &bad_mirror,
    ])
    .ok();
    let dst3 = w.dir("dst3");
    let out = w.read(&["restore", "latest", s(&dst3), "-t", "node"]).ok();
    assert!(out.contains(&format!("mirror {bad_mirror}")), "{out}");
    let out = w
        .read(&[
            "restore",
            "latest",
            s(&w.dir("dst4")),
            "-t",
            "node",
            "--no-listed-mirrors",
        ])
        .ok();
    assert!(!out.contains("mirror "), "{out}");
    // A bad list is refused, one line.
    let e = w
        .btm(&[
            "publish",
            "-s",
            s(&w.store),
            "--signing-key",
            s(&w.key),
            "--mirror-list",
            "/srv/x",
        ])
        .fails(2);
    assert!(e.contains("a local path means nothing"), "{e}");
}

/// Two publishers of one store at once, 20 backups each under their own
/// tags, each `--publish`: the catalog ends up listing all 40 (every
/// catalog write is a compare-and-swap; a writer that loses redoes its
/// change on the new catalog).
fn two_publishers_lose_nothing(store: &str, env: &[(&'static str, String)]) {
    let scratch = tempfile::tempdir().expect("tmp");
    let key = scratch.path().join("publisher.key");
    let out = btm(scratch.path(), &["key", "generate", s(&key)]).ok();
    let public = out.trim().lines().last().expect("public key").to_owned();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    std::thread::scope(|t| {
        for who in ["a", "b"] {
            let (scratch, key, env) = (scratch.path(), &key, &env);
            t.spawn(move || {
                let src = scratch.join(format!("src-{who}"));
                std::fs::create_dir_all(&src).expect("mkdir");
                for i in 0..20u64 {
                    std::fs::write(src.join("state"), noise(i, 10_000)).expect("w");
                    let tag = format!("node-{who}");
                    let args = [
                        "backup",
                        s(&src),
                        "-s",
                        store,
                        "-t",
                        &tag,
                        "--publish",
                        "--signing-key",
                        s(key),
                    ];
                    common::btm_env_ok(scratch, &args, env);
                }
            });
        }
    });
    // Read through the catalog alone: what a stranger sees.
    let args = ["backups", "-s", store, "--json", "--trust", &public];
    let listed: serde_json::Value =
        serde_json::from_str(&common::btm_env_ok(scratch.path(), &args, &env)).expect("json");
    let n = listed.as_array().map_or(0, Vec::len);
    assert_eq!(n, 40, "{listed}");
}

#[test]
fn two_publishers_of_a_local_store_lose_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    two_publishers_lose_nothing(s(&dir.path().join("store")), &[]);
}

/// S3 over s3s-fs, which checks `If-Match` and then writes, not
/// atomically as S3 does: a proxy forwards the catalog's PUTs one at a
/// time, which makes the server's check-then-write atomic; what is tested
/// is btm's side of the protocol (a 39 of 40 without the proxy was
/// s3s-fs's race, not btm's).
#[test]
fn two_publishers_of_an_s3_store_lose_nothing() {
    let server = common::S3::start(&["pub"]);
    let proxy = FaultProxy::start(server.port, 0);
    proxy.one_put_at_a_time("/catalog");
    two_publishers_lose_nothing("s3://pub/x", &server.env_via(&proxy.url()));
}
