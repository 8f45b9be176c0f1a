//! The store contract (see `src/store/mod.rs`), one suite run against every
//! backend: the local directory store, and S3 through a real S3-compatible
//! server (`s3s-fs`, installed by scripts/test.sh) started on loopback.
//! A backend that cannot be set up fails the run; nothing is skipped.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use btm_chunk::store::{Bytes, Id, Kind, LocalStore, Store, StoreError};

fn contract(store: &dyn Store) {
    for kind in Kind::ALL {
        assert!(store.list(kind).expect("list").is_empty(), "{kind:?}");
    }
    assert!(store.list_indexes().expect("list").is_empty());

    // Write-once objects: a second put under the same id keeps the first,
    // and kinds do not mix.
    let h = Id::of(b"object one");
    for kind in Kind::ALL {
        store
            .put(kind, &h, Bytes::from_static(b"first"))
            .expect("put");
        store
            .put(kind, &h, Bytes::from_static(b"second"))
            .expect("put again is not an error");
        assert_eq!(&store.get(kind, &h).expect("get")[..], b"first", "{kind:?}");
        assert_eq!(store.list(kind).expect("list"), vec![(h, 5)], "{kind:?}");
    }
    let missing = Id::of(b"never stored");
    assert!(matches!(
        store.get(Kind::Pack, &missing),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.size(Kind::Pack, &h).expect("size"), 5);
    assert!(matches!(
        store.size(Kind::Pack, &missing),
        Err(StoreError::NotFound(_))
    ));

    // Ranged reads: exactly the bytes asked for, or an error.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let p = Id::of(&data);
    store
        .put(Kind::Pack, &p, Bytes::from(data.clone()))
        .expect("put pack");
    for (off, len) in [(0, 1), (99_999, 1), (12_345, 40_000), (0, 100_000)] {
        assert_eq!(
            &store.get_range(Kind::Pack, &p, off, len).expect("range")[..],
            &data[off as usize..(off + len) as usize]
        );
    }
    // Into a reused buffer: its old contents are replaced, whatever their
    // length.
    let mut buf = vec![7u8; 50_000];
    for (off, len) in [(12_345, 40_000), (5, 3), (0, 100_000), (99_999, 1)] {
        store
            .get_range_into(Kind::Pack, &p, off, len, &mut buf)
            .expect("range into");
        assert_eq!(buf, &data[off as usize..(off + len) as usize]);
    }
    assert!(
        store.get_range(Kind::Pack, &p, 99_990, 20).is_err(),
        "a range past the end"
    );
    assert!(
        store
            .get_range_into(Kind::Pack, &p, 99_990, 20, &mut buf)
            .is_err(),
        "a range past the end, into a buffer"
    );
    assert!(matches!(
        store.get_range_into(Kind::Pack, &missing, 0, 1, &mut buf),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.get_range(Kind::Pack, &missing, 0, 1),
        Err(StoreError::NotFound(_))
    ));

    // Racing writers of one object leave one valid copy.
    let h2 = Id::of(b"raced");
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                store
                    .put(Kind::Pack, &h2, Bytes::from_static(b"same bytes"))
                    .expect("racing put")
            });
        }
    });
    assert_eq!(&store.get(Kind::Pack, &h2).expect("get")[..], b"same bytes");

    // Indexes: atomic, write-once, listable, deletable.
    let name = "20260101T000000.000000000Z--suite";
    store.put_index(name, b"index bytes").expect("put index");
    assert!(
        store.put_index(name, b"other").is_err(),
        "an index must never be replaced"
    );
    assert_eq!(store.get_index(name).expect("get"), b"index bytes");
    assert_eq!(store.list_indexes().expect("list"), vec![name.to_owned()]);
    assert!(matches!(
        store.get_index("nope"),
        Err(StoreError::NotFound(_))
    ));
    store.delete_index(name).expect("delete");
    store.delete_index(name).expect("deleting twice is fine");
    assert!(store.list_indexes().expect("list").is_empty());

    for kind in Kind::ALL {
        store.delete(kind, &h).expect("delete");
        store.delete(kind, &h).expect("deleting twice is fine");
    }
    let mut packs = store.list(Kind::Pack).expect("list");
    packs.sort();
    let mut want = vec![(p, 100_000), (h2, 10)];
    want.sort();
    assert_eq!(packs, want);
    assert!(store.list(Kind::Tree).expect("list").is_empty());

    // Many objects are listed in one go (pagination on object stores), and
    // a flat kind (pack indexes) lists as well as a fanned-out one.
    for kind in [Kind::Tree, Kind::PackIndex] {
        let many: Vec<Id> = (0..1200u32).map(|i| Id::of(&i.to_le_bytes())).collect();
        std::thread::scope(|s| {
            for part in many.chunks(150) {
                s.spawn(move || {
                    for h in part {
                        store.put(kind, h, Bytes::from_static(b"x")).expect("put");
                    }
                });
            }
        });
        assert_eq!(store.list(kind).expect("list").len(), 1200, "{kind:?}");
    }

    // Markers: replaceable, listed with the store's time, never mixed up
    // with objects or indexes.
    let before = chrono::Utc::now() - chrono::Duration::seconds(60);
    assert!(store.list_markers("locks").expect("list").is_empty());
    store.put_marker("locks/export-a", b"one").expect("put");
    store.put_marker("locks/export-a", b"two").expect("replace");
    store.put_marker("gc/marks/m1", b"mark").expect("put");
    assert_eq!(store.get_marker("locks/export-a").expect("get"), b"two");
    let locks = store.list_markers("locks").expect("list");
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].name, "locks/export-a");
    assert!(locks[0].modified > before, "{locks:?}");
    let gc = store.list_markers("gc").expect("list");
    assert_eq!(
        gc.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["gc/marks/m1"]
    );
    assert!(matches!(
        store.get_marker("locks/none"),
        Err(StoreError::NotFound(_))
    ));
    for bad in ["indexes/x", "locks/../packs/x", "locks/", "gc/a b"] {
        assert!(store.put_marker(bad, b"x").is_err(), "{bad}");
    }
    store.delete_marker("locks/export-a").expect("delete");
    store.delete_marker("locks/export-a").expect("twice");
    store.delete_marker("gc/marks/m1").expect("delete");
    assert!(store.list_markers("locks").expect("list").is_empty());
    assert!(store.list_markers("gc").expect("list").is_empty());
    assert_eq!(store.list_indexes().expect("list"), Vec::<String>::new());
    assert_eq!(store.list(Kind::Tree).expect("list").len(), 1200);
}

/// The in-memory store the unit tests of the layers above use.
#[test]
fn mem_store_meets_the_contract() {
    contract(&btm_chunk::store::MemStore::new());
}

#[test]
fn local_store_meets_the_contract() {
    let dir = tempfile::tempdir().expect("tmp");
    contract(&LocalStore::open(&dir.path().join("s").display().to_string()).expect("open"));
}

#[test]
fn s3_store_meets_the_contract_and_round_trips_a_backup() {
    let s3 = common::S3::start(&["btm"]);
    for (k, v) in s3.env() {
        std::env::set_var(k, v);
    }
    contract(
        btm_chunk::store::open("s3://btm/suite")
            .expect("open s3")
            .as_ref(),
    );

    round_trip_through_cli("s3://btm/backups", &s3.env());
    let dir = tempfile::tempdir().expect("tmp");
    // A bucket that does not exist is a clear failure, not a hang.
    let mut c = common::btm_cmd(dir.path(), &["backups", "-s", "s3://no-such-bucket/x"]);
    c.envs(s3.env());
    let out = c.output().expect("btm");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sparse tree backed up, restored and checked through `store` with the
/// CLI, byte- and hole-exact.
fn round_trip_through_cli(store: &str, env: &[(&'static str, String)]) {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    let f = std::fs::File::create(src.join("state.db")).expect("create");
    f.set_len(32 << 20).expect("len");
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 100_000], 5 << 20).expect("write");
    std::fs::write(src.join("small"), b"hello").expect("w");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = |args: &[&str]| common::btm_env_ok(dir.path(), args, &env);
    run(&[
        "backup",
        src.to_str().expect("utf8"),
        "-s",
        store,
        "-t",
        "roundtrip",
    ]);
    let dst = dir.path().join("dst");
    run(&[
        "restore",
        "latest",
        dst.to_str().expect("utf8"),
        "-s",
        store,
        "-t",
        "roundtrip",
    ]);
    assert_eq!(std::fs::read(dst.join("small")).expect("read"), b"hello");
    let (a, b) = (
        std::fs::read(src.join("state.db")).expect("a"),
        std::fs::read(dst.join("state.db")).expect("b"),
    );
    assert!(a == b, "state.db differs after the S3 round trip");
    use std::os::unix::fs::MetadataExt;
    let blocks = |p: &Path| std::fs::metadata(p).expect("m").blocks();
    assert!(blocks(&dst.join("state.db")) <= blocks(&src.join("state.db")));
    let check = run(&["check", "-s", store, "--read-data"]);
    assert!(check.contains("0 problems"), "{check}");
}

/// An Azurite blob emulator on a free loopback port, killed by PID on drop.
struct Azurite {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// Azurite's fixed development account and key (public, documented by
/// Microsoft; object_store uses the same pair in emulator mode).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Creates a container with a SharedKey-signed request. object_store has no
/// "create container" call, and Azurite refuses anonymous requests, so the
/// signing is done here by node (already needed for Azurite itself).
const CREATE_CONTAINER_JS: &str = r#"
const [port, account, key, container] = process.argv.slice(1);
const crypto = require('crypto'), http = require('http');
const date = new Date().toUTCString(), version = '2021-08-06';
const sts = ['PUT', '', '', '', '', '', '', '', '', '', '', '',
  `x-ms-date:${date}\nx-ms-version:${version}`,
  `/${account}/${account}/${container}\nrestype:container`].join('\n');
const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64')).update(sts).digest('base64');
const req = http.request({ host: '127.0.0.1', port, method: 'PUT',
  path: `/${account}/${container}?restype=container`,
  headers: { 'x-ms-date': date, 'x-ms-version': version, 'Content-Length': 0,
             Authorization: `SharedKey ${account}:${sig}` } }, res => {
  let body = ''; res.on('data', d => body += d);
  res.on('end', () => { if (res.statusCode !== 201) { console.error(res.statusCode, body); process.exit(1); } });
});
req.on('error', e => { console.error(e.message); process.exit(1); });
req.end();
"#;

impl Azurite {
    fn start(containers: &[&str]) -> Self {
        let bin = std::env::var_os("AZURITE_BIN").unwrap_or_else(|| "azurite-blob".into());
        let dir = tempfile::tempdir().expect("tmp");
        let port = common::free_port();
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path())
            .args(["--silent", "--skipApiVersionCheck", "--loose"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start azurite ({bin:?}): {e}; scripts/test.sh installs it")
            });
        let az = Azurite {
            child,
            port,
            _dir: dir,
        };
        // Node starts slowly on a loaded machine; this waits for it, it
        // does not time anything.
        let mut up = false;
        for _ in 0..1200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                up = true;
                break;
            }
            sleep(Duration::from_millis(50));
        }
        assert!(up, "azurite did not listen on port {port}");
        for c in containers {
            let out = Command::new("node")
                .args(["-e", CREATE_CONTAINER_JS])
                .args([&port.to_string(), AZURITE_ACCOUNT, AZURITE_KEY, c])
                .output()
                .expect("node");
            assert!(
                out.status.success(),
                "creating container {c}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        az
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            (
                "AZURITE_BLOB_STORAGE_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
        ]
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn azure_store_meets_the_contract_and_round_trips_a_backup() {
    let az = Azurite::start(&["btm"]);
    for (k, v) in az.env() {
        std::env::set_var(k, v);
    }
    contract(
        btm_chunk::store::open("az://btm/suite")
            .expect("open azure")
            .as_ref(),
    );
    round_trip_through_cli("az://btm/backups", &az.env());
}
