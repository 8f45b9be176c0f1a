//! The object stores over a bad network: a proxy in front of a real S3
//! server (s3s-fs) and the Azure emulator (Azurite) throttles the link,
//! stalls requests, answers 503 SlowDown and 500, resets connections, cuts
//! answers short, and loses the answer to a put that the store committed.
//! Backups and restores through it must succeed, exactly, and say nothing
//! untrue.

mod common;

use std::path::Path;
use std::time::Duration;

use common::http_faults::{Fault, FaultProxy, Rule};

/// A store server, and how a client reaches it through a proxy.
enum Server {
    S3(common::S3),
    Azure(common::Azurite),
}

impl Server {
    fn start(kind: &str) -> Self {
        match kind {
            "s3" => Server::S3(common::S3::start(&["btm"])),
            _ => Server::Azure(common::Azurite::start(&["btm"])),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Server::S3(s) => s.port,
            Server::Azure(a) => a.port,
        }
    }

    /// The store URL, and the environment of a client that goes through
    /// `proxy`, whose requests stop making progress after `stall`.
    fn through(
        &self,
        proxy: &FaultProxy,
        prefix: &str,
        stall: &str,
    ) -> (String, Vec<(&'static str, String)>) {
        let (url, mut env) = match self {
            Server::S3(s) => (format!("s3://btm/{prefix}"), s.env_via(&proxy.url())),
            Server::Azure(a) => (format!("az://btm/{prefix}"), a.env_via(&proxy.url())),
        };
        env.push(("BTM_STORE_TIMEOUT", stall.to_owned()));
        (url, env)
    }
}

fn run(scratch: &Path, args: &[&str], store: &str, env: &[(&'static str, String)]) -> common::Run {
    let mut all = args.to_vec();
    all.extend(["-s", store]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    common::btm_env(scratch, &all, &env)
}

/// Back `src` up through the proxy, restore it into a new directory, check
/// it byte for byte, and check the store; returns the backup's stderr.
fn round_trip(scratch: &Path, src: &Path, store: &str, env: &[(&'static str, String)]) -> String {
    let backup = run(
        scratch,
        &["backup", src.to_str().expect("utf8"), "-t", "net"],
        store,
        env,
    );
    let stderr = backup.stderr.clone();
    backup.ok();
    let listed = run(scratch, &["backups", "-t", "net", "--json"], store, env).ok();
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let dst = scratch.join(format!("dst-{}", store.replace(['/', ':'], "_")));
    run(
        scratch,
        &[
            "restore",
            "latest",
            dst.to_str().expect("utf8"),
            "-t",
            "net",
        ],
        store,
        env,
    )
    .ok();
    for e in std::fs::read_dir(src).expect("ls").flatten() {
        let name = e.file_name();
        assert!(
            std::fs::read(e.path()).expect("src") == std::fs::read(dst.join(&name)).expect("dst"),
            "{name:?} differs"
        );
    }
    let check = run(scratch, &["check", "--read-data"], store, env).ok();
    assert!(check.contains("; 0 problems"), "{check}");
    stderr
}

fn tree(dir: &Path, files: &[(&str, usize)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for (i, (name, len)) in files.iter().enumerate() {
        std::fs::write(dir.join(name), common::noise(500 + i as u64, *len)).expect("write");
    }
}

/// Over a link slower than the timeout allows for a whole pack
/// (6 MiB at 1 MiB/s, with a 3 s limit), a backup and a restore still go
/// through: the limit bounds a lack of progress, not a transfer.
fn a_slow_link_is_not_a_dead_store(kind: &str) {
    let server = Server::start(kind);
    let proxy = FaultProxy::start(server.port(), 1 << 20);
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    tree(&src, &[("pack", 6 << 20)]);
    let (store, env) = server.through(&proxy, "slow", "3s");
    round_trip(dir.path(), &src, &store, &env);
}

/// How long the proxy holds a stalled request before it closes it.
const STALL: Duration = Duration::from_secs(120);

/// A request that stops making progress (an upload the far end
/// stops reading, a GET never answered) is timed out and tried again.
fn a_stalled_request_is_timed_out_and_tried_again(kind: &str) {
    let server = Server::start(kind);
    let proxy = FaultProxy::start(server.port(), 0);
    for (method, path) in [("PUT", "packs/"), ("GET", "packs/"), ("PUT", "indexes/")] {
        proxy.add(Rule {
            method,
            path,
            fault: Fault::Stall(STALL),
            times: 1,
        });
    }
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    // A pack larger than the socket buffers can hold: a stalled upload
    // stops taking its pieces.
    tree(&src, &[("a", 12 << 20), ("b", 100_000)]);
    let (store, env) = server.through(&proxy, "stall", "2s");
    let started = std::time::Instant::now();
    round_trip(dir.path(), &src, &store, &env);
    assert_eq!(proxy.injected().len(), 3, "{:?}", proxy.injected());
    // Had a stalled request waited until the proxy gave up on it, one
    // would have taken the whole stall.
    assert!(started.elapsed() < STALL, "{:?}", started.elapsed());
}

/// 503 SlowDown, 500, connections reset, answers cut short,
/// and a head the store committed but whose answer was lost (500): each is
/// retried with backoff, and the backup, which is in the store, is
/// reported as written.
fn transient_failures_are_retried(kind: &str) {
    let server = Server::start(kind);
    let proxy = FaultProxy::start(server.port(), 0);
    let rules = [
        ("PUT", "packs/", Fault::Answer(503), 2),
        ("PUT", "packs/", Fault::Reset, 1),
        ("PUT", "packidx/", Fault::Answer(500), 1),
        ("PUT", "trees/", Fault::Reset, 1),
        ("PUT", "indexes/", Fault::CommitThenAnswer(500), 1),
        ("GET", "packs/", Fault::Truncate, 1),
        ("GET", "packs/", Fault::Reset, 1),
        ("GET", "packs/", Fault::Answer(503), 1),
    ];
    for (method, path, fault, times) in rules {
        proxy.add(Rule {
            method,
            path,
            fault,
            times,
        });
    }
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    tree(&src, &[("a", 5 << 20), ("b", 200_000), ("c", 3 << 20)]);
    let (store, env) = server.through(&proxy, "flaky", "10s");
    round_trip(dir.path(), &src, &store, &env);
    let injected = proxy.injected();
    for (method, path, fault, times) in rules {
        let want = format!("{fault:?} {method}");
        let n = injected
            .iter()
            .filter(|l| l.starts_with(&want) && l.contains(path))
            .count();
        assert_eq!(n, times as usize, "{want} {path}: {injected:?}");
    }
}

#[test]
fn s3_over_a_slow_link_is_not_a_dead_store() {
    a_slow_link_is_not_a_dead_store("s3");
}

#[test]
fn azure_over_a_slow_link_is_not_a_dead_store() {
    a_slow_link_is_not_a_dead_store("azure");
}

#[test]
fn s3_stalled_requests_are_timed_out_and_tried_again() {
    a_stalled_request_is_timed_out_and_tried_again("s3");
}

#[test]
fn azure_stalled_requests_are_timed_out_and_tried_again() {
    a_stalled_request_is_timed_out_and_tried_again("azure");
}

#[test]
fn s3_transient_failures_are_retried_and_a_committed_head_is_a_success() {
    transient_failures_are_retried("s3");
}

#[test]
fn azure_transient_failures_are_retried_and_a_committed_head_is_a_success() {
    transient_failures_are_retried("azure");
}

/// Attempts the proxy saw per object, for requests with `method` under
/// `path`.
fn attempts_per_object(proxy: &FaultProxy, method: &str, path: &str) -> Vec<usize> {
    let mut per: std::collections::BTreeMap<String, usize> = Default::default();
    for line in proxy.injected() {
        let mut words = line.split_whitespace();
        let (_, m, target) = (words.next(), words.next(), words.next());
        if m == Some(method) {
            if let Some(t) = target.filter(|t| t.contains(path)) {
                *per.entry(t.split('?').next().unwrap_or(t).to_owned())
                    .or_default() += 1;
            }
        }
    }
    per.into_values().collect()
}

/// A store that keeps failing one kind of request (`fault` on `method`
/// under `packs/`): the command fails, naming the attempts, and each
/// object was asked for exactly the policy's attempts: the HTTP client
/// under the policy repeats nothing (object_store's own retries are off).
fn a_failing_call_makes_the_policys_attempts_once(kind: &str, method: &'static str, fault: Fault) {
    let server = Server::start(kind);
    let proxy = FaultProxy::start(server.port(), 0);
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    tree(&src, &[("a", 300_000)]);
    let (store, env) = server.through(&proxy, "failing", "10s");
    if method == "GET" {
        run(
            dir.path(),
            &["backup", src.to_str().expect("utf8"), "-t", "net"],
            &store,
            &env,
        )
        .ok();
    }
    proxy.add(Rule {
        method,
        path: "packs/",
        fault,
        times: u32::MAX,
    });
    let dst = dir.path().join("dst");
    let args: &[&str] = match method {
        "GET" => &[
            "restore",
            "latest",
            dst.to_str().expect("utf8"),
            "-t",
            "net",
        ],
        _ => &["backup", src.to_str().expect("utf8"), "-t", "net"],
    };
    let failed = run(dir.path(), args, &store, &env);
    let attempts = btm_chunk::store::RetryPolicy::ATTEMPTS as usize;
    let last = failed.stderr.trim().lines().last().unwrap_or_default();
    assert!(failed.code != 0, "{}", failed.stderr);
    assert!(
        last.starts_with("btm: error: ") && last.contains(&format!("{attempts} attempts")),
        "{}",
        failed.stderr
    );
    assert_eq!(
        attempts_per_object(&proxy, method, "packs/"),
        vec![attempts]
    );
}

#[test]
fn s3_a_failing_get_makes_the_policys_attempts_once() {
    a_failing_call_makes_the_policys_attempts_once("s3", "GET", Fault::Reset);
}

#[test]
fn azure_a_failing_put_makes_the_policys_attempts_once() {
    a_failing_call_makes_the_policys_attempts_once("azure", "PUT", Fault::Answer(503));
}
