//! The Kubernetes manifests of `deploy/kubernetes`, run as far as a machine
//! without a cluster can run them:
//!
//! - every directory renders with `kubectl kustomize`, and `kubectl apply
//!   --dry-run=client --validate=false` accepts the result (against a
//!   discovery stub, `kube/discovery.py`: there is no API server here);
//! - the OCI image `make image` builds is static, small, non-root, and
//!   reads as both an OCI and a Docker archive;
//! - pods run with Debian's podman (`podman kube play`, runc, cgroupfs, a
//!   descriptor limit of 1024) on what `kubectl kustomize` renders from the
//!   examples, through a test overlay that does what a user's overlay
//!   does: our images, our store's address and credentials, host
//!   networking. podman does not run StatefulSets or Jobs, so
//!   `kube/to_pods.py` plays their pod templates as Pods (their claims as
//!   volumes), unchanged; and podman 4.3 does not resolve a Secret in
//!   `envFrom` (podman#16623), so the overlay gives the same keys from a
//!   ConfigMap. podman does not apply `fsGroup`: it gives a new volume to
//!   the user of the first container that mounts it, and where that is not
//!   the pod's user the test does what the kubelet's `fsGroup` would;
//! - a real node: litecoind (a Bitcoin-Core-family node, from Debian's
//!   packages in an image the suite builds) on a volume the init container
//!   restores from s3s-fs on the host, as the pod's user, resumed after the
//!   pod is killed mid-restore, exact, and proven by `btm verify`;
//! - fail closed: another publisher's key, a height no backup has, an
//!   unreachable store, an empty store, another chain's backup over a
//!   volume holding this one, and a ConfigMap without the store each leave
//!   the node container never started, with the reason as the init
//!   container's last log line (or podman's, naming the missing key);
//! - the export Job backs up a volume (a snapshot's clone) at its height;
//! - the live variant's sidecar serves at once and finishes on the pod's
//!   stop (see its test for what podman cannot run of it).
//!
//! Needs root, podman, buildah's image archives (`BTM_IMAGE`,
//! `BTM_TEST_NODE_IMAGE`), kubectl, litecoind, s3s-fs and python3-yaml:
//! scripts/test.sh provides them. Fails, never skips, without them.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::S3;

const RPC_PASSWORD: &str = "k8s-test-password";
/// The pod of the bitcoin-core example's StatefulSet, and its containers.
const POD: &str = "bitcoin-0";
const INIT: &str = "bitcoin-0-btm-restore";
const NODE: &str = "bitcoin-0-node";
const VOLUME: &str = "data-bitcoin-0";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/kubernetes")
        .canonicalize()
        .expect("deploy/kubernetes")
}

fn kube_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kube")
        .join(name)
}

/// An image archive scripts/test.sh built, named by `var`.
fn archive(var: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: scripts/test.sh builds {what}"));
    assert!(p.is_file(), "{var}={} is not a file", p.display());
    p
}

#[track_caller]
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl kustomize` of a kustomization over `base` (a directory under
/// deploy/kubernetes), written with the test's `body` in a directory of
/// its own, as a user's overlay is.
fn render(base: &str, body: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let up = "../".repeat(dir.path().components().count() - 1);
    let target = deploy_dir().join(base);
    let rel = format!(
        "{up}{}",
        target.to_str().expect("utf8").trim_start_matches('/')
    );
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!("resources: [{rel}]\n{body}"),
    )
    .expect("kustomization");
    run(Command::new("kubectl").arg("kustomize").arg(dir.path()))
}

/// What `podman kube play` can run of `rendered` (see `kube/to_pods.py`).
fn playable(rendered: &str, with_claims: bool) -> String {
    playable_with(
        rendered,
        if with_claims {
            &[]
        } else {
            &["--without-claims"]
        },
    )
}

/// The same, with `kube/to_pods.py`'s `options`.
fn playable_with(rendered: &str, options: &[&str]) -> String {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(kube_script("to_pods.py")).args(options);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rendered.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("to_pods.py");
    assert!(out.status.success(), "to_pods.py failed");
    String::from_utf8(out.stdout).expect("utf8")
}

/// A podman of the test's own: its storage, runtime directories and
/// `containers.conf` in a temporary directory, with both images loaded.
/// Everything it made is removed on drop.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("btm-podman-")
            .tempdir_in("/var/tmp")
            .expect("tmp");
        // runc, not crun (which fails on this kernel's hybrid cgroups);
        // cgroupfs, not systemd; limits given explicitly (an ordinary
        // machine's 1024 descriptors; podman 4.3's kube play swaps a soft
        // and hard limit that differ, so both are 1024).
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).expect("tmp");
        std::fs::write(
            dir.path().join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\n\
                 events_logger = \"file\"\ntmp_dir = \"{}\"\n",
                tmp.display()
            ),
        )
        .expect("containers.conf");
        let p = Podman { dir };
        for (var, what) in [
            ("BTM_IMAGE", "btm-image.tar (make image)"),
            ("BTM_TEST_NODE_IMAGE", "the litecoind test image"),
        ] {
            let a = archive(var, what);
            p.ok(&["load", "-q", "-i", a.to_str().expect("utf8")]);
        }
        p
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.path().join("storage"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .args(args)
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .stdin(Stdio::null());
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("podman runs")
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        run(&mut self.cmd(args))
    }

    /// `podman kube play` of `yaml`; waits for the init containers.
    fn play(&self, yaml: &str) -> Output {
        let f = self.dir.path().join("play.yaml");
        std::fs::write(&f, yaml).expect("yaml");
        self.output(&["kube", "play", f.to_str().expect("utf8")])
    }

    /// The same, in the background.
    fn play_in_background(&self, yaml: &str) -> Child {
        let f = self.dir.path().join("play-bg.yaml");
        std::fs::write(&f, yaml).expect("yaml");
        self.cmd(&["kube", "play", f.to_str().expect("utf8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("podman")
    }

    /// Remove the pod (killing what runs), keeping its volumes, as a
    /// deleted or evicted pod leaves its claims.
    fn remove_pod(&self, pod: &str) {
        let _ = self.output(&["pod", "rm", "-f", "-t", "0", pod]);
    }

    /// A container's state and exit code, if it exists.
    fn state(&self, container: &str) -> Option<(String, i64)> {
        let out = self.output(&[
            "inspect",
            "--type",
            "container",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            container,
        ]);
        let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let (status, code) = s.split_once(' ')?;
        Some((status.to_owned(), code.parse().ok()?))
    }

    /// Everything a container wrote, stdout and stderr together.
    fn logs(&self, container: &str) -> String {
        let out = self.output(&["logs", container]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Make the directory podman keeps named volumes in a shared mount, as
    /// a kubelet's is (systemd makes `/` shared): a mount a container makes
    /// on a volume with Bidirectional propagation then reaches the host and
    /// the pod's other containers.
    fn share_volumes(&self) {
        let v = self.dir.path().join("storage/volumes");
        std::fs::create_dir_all(&v).expect("volumes");
        run(Command::new("mount").arg("--bind").arg(&v).arg(&v));
        run(Command::new("mount").arg("--make-rshared").arg(&v));
    }

    fn volume_dir(&self, name: &str) -> PathBuf {
        PathBuf::from(
            self.ok(&["volume", "inspect", "--format", "{{.Mountpoint}}", name])
                .trim(),
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.output(&["pod", "rm", "-a", "-f", "-t", "0"]);
        let _ = self.output(&["rm", "-a", "-f", "-t", "0"]);
        let _ = self.output(&["volume", "rm", "-a", "-f"]);
        let _ = self.output(&["rmi", "-a", "-f"]);
        // Anything podman left mounted under its directories.
        let root = self.dir.path().to_str().expect("utf8").to_owned();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&root))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// Wait until `f` says yes, or fail saying `what`.
#[track_caller]
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(200));
    }
}

/// litecoind on regtest in `datadir`, its RPC answering: the process and
/// its RPC port, or `None` if it exited first (its port taken).
fn start_litecoind(datadir: &Path) -> Option<(Child, u16)> {
    let rpc_port = common::free_port();
    let mut node = Command::new("litecoind")
        .args([
            "-regtest",
            "-server",
            "-listen=0",
            "-daemon=0",
            "-printtoconsole=0",
        ])
        .arg(format!("-datadir={}", datadir.display()))
        .arg(format!("-rpcport={rpc_port}"))
        .args(["-rpcuser=btm", &format!("-rpcpassword={RPC_PASSWORD}")])
        .arg("-fallbackfee=0.0001")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("litecoind not found: scripts/test.sh installs it");
    let options = [
        "-rpcuser=btm".to_owned(),
        format!("-rpcpassword={RPC_PASSWORD}"),
        format!("-rpcport={rpc_port}"),
    ];
    let t = Instant::now();
    loop {
        if common::litecoin_cli(&options, &["getblockcount"]).is_some() {
            return Some((node, rpc_port));
        }
        if let Ok(Some(_)) = node.try_wait() {
            return None;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = node.kill();
            let _ = node.wait();
            panic!("litecoind's RPC: not within 120 s");
        }
        sleep(Duration::from_millis(200));
    }
}

/// The host side: s3s-fs holding an export of a real litecoind chain at
/// height 120, and the node that made it, still running (its RPC says
/// which block it has at 120).
struct Chain {
    s3: S3,
    dir: tempfile::TempDir,
    node: Child,
    rpc_port: u16,
}

impl Chain {
    fn start() -> Self {
        let s3 = S3::start(&["ltc", "empty", "exports"]);
        let dir = tempfile::tempdir().expect("tmp");
        let datadir = dir.path().join("node");
        std::fs::create_dir(&datadir).expect("datadir");
        // A port another test takes between its probe and litecoind's bind
        // makes litecoind exit at once: it is started again on another.
        let (node, rpc_port) = (1..=3)
            .find_map(|_| start_litecoind(&datadir))
            .expect("litecoind exited at start three times");
        let chain = Chain {
            s3,
            dir,
            node,
            rpc_port,
        };
        chain.cli(&["createwallet", "w"]);
        let addr = chain.cli(&["getnewaddress"]);
        chain.cli(&["generatetoaddress", "120", &addr]);
        // Written out, then copied as a volume snapshot would be.
        chain.cli(&["gettxoutsetinfo", "none"]);
        let clone = chain.clone_dir();
        run(Command::new("cp").arg("-a").arg(&datadir).arg(&clone));
        // Cold data beside the chain, so that a rate-limited restore is
        // still running when the test stops its pod.
        common::live::write_noise(&clone.join("regtest/extra.bin"), 32 << 20);
        let (clone_s, port) = (clone.to_str().expect("utf8"), rpc_port.to_string());
        chain
            .btm(&[
                "backup",
                clone_s,
                "-s",
                "s3://ltc",
                "-t",
                "ltc",
                "--height",
                "120",
                "--rpc-url",
                &format!("http://127.0.0.1:{port}"),
                "--rpc-kind",
                "bitcoin",
                "--rpc-user",
                "btm",
            ])
            .ok();
        chain
    }

    /// The copy of the node's data that was backed up.
    fn clone_dir(&self) -> PathBuf {
        self.dir.path().join("clone")
    }

    fn try_cli(&self, port: u16, args: &[&str]) -> Option<String> {
        let options = [
            "-rpcuser=btm".to_owned(),
            format!("-rpcpassword={RPC_PASSWORD}"),
            format!("-rpcport={port}"),
        ];
        common::litecoin_cli(&options, args)
    }

    #[track_caller]
    fn cli(&self, args: &[&str]) -> String {
        self.try_cli(self.rpc_port, args)
            .unwrap_or_else(|| panic!("litecoin-cli {args:?} failed"))
    }

    /// `btm ARGS` on the host, with the store's credentials.
    fn btm(&self, args: &[&str]) -> common::Run {
        let env = self.s3.env();
        let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.push(("BTM_RPC_PASSWORD", RPC_PASSWORD));
        common::btm_env(self.dir.path(), args, &env)
    }

    /// The store's credentials and address, as `KEY=value` literals.
    fn credentials(&self, endpoint_port: u16) -> String {
        self.s3
            .env_via(&format!("http://127.0.0.1:{endpoint_port}"))
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain([format!("BTM_RPC_PASSWORD={RPC_PASSWORD}")])
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = self.try_cli(self.rpc_port, &["stop"]);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.node.try_wait() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
        let _ = self.node.kill();
        let _ = self.node.wait();
    }
}

/// What the node container runs: litecoind on `rpc_port`, or nothing but
/// a wait (to look at what the init container restored, untouched).
enum NodeRuns {
    Litecoind(u16),
    Nothing,
}

/// The test overlay of the bitcoin-core example: our images, the
/// `btm-restore` settings given, our store's credentials (from a
/// ConfigMap, see the top), host networking, init containers kept after
/// they exit (podman removes them otherwise, and their logs with them).
fn node_overlay(chain: &Chain, s3_port: u16, restore: &[&str], node: NodeRuns) -> String {
    let (command, args) = match node {
        NodeRuns::Litecoind(port) => (
            "[litecoind]".to_owned(),
            format!(
                "[-regtest, -datadir=/data, -printtoconsole, -server, -listen=0, -rpcport={port}, -rpcuser=btm, -rpcpassword={RPC_PASSWORD}]"
            ),
        ),
        NodeRuns::Nothing => ("[sleep]".to_owned(), "[infinity]".to_owned()),
    };
    overlay_body(
        &restore.join(", "),
        &chain.credentials(s3_port),
        &command,
        &args,
        true,
    )
}

/// The test overlay's body: `restore` and `credentials` as ConfigMap
/// literals, the node container's `command` and `args` (YAML lists), and
/// with `keep_inits` the annotation that keeps init containers (and their
/// logs) after they exit.
fn overlay_body(
    restore: &str,
    credentials: &str,
    command: &str,
    args: &str,
    keep_inits: bool,
) -> String {
    let keep = if keep_inits {
        "      - {op: add, path: /spec/template/metadata/annotations, value: {io.podman.annotations.init.container.type: always}}\n"
    } else {
        ""
    };
    format!(
        r#"images:
  - {{name: docker.io/bitcoin/bitcoin, newName: localhost/btm-test-litecoind, newTag: "1"}}
configMapGenerator:
  - name: btm-restore
    behavior: replace
    literals: [{restore}]
  - name: btm-test-credentials
    literals: [{credentials}]
patches:
  - target: {{kind: StatefulSet, name: bitcoin}}
    patch: |
      - {{op: add, path: /spec/template/spec/hostNetwork, value: true}}
      - {{op: remove, path: /spec/template/spec/containers/0/ports}}
      - {{op: replace, path: /spec/template/spec/containers/0/command, value: {command}}}
      - {{op: replace, path: /spec/template/spec/containers/0/args, value: {args}}}
      - {{op: replace, path: /spec/template/spec/initContainers/0/envFrom/0, value: {{configMapRef: {{name: btm-test-credentials}}}}}}
{keep}"#
    )
}

/// The init container's summary: the JSON of its last line.
fn summary(podman: &Podman) -> serde_json::Value {
    let logs = podman.logs(INIT);
    let last = logs.lines().last().unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(last).unwrap_or_else(|e| {
        panic!("the init container's last line is not its summary ({e}): {logs}")
    })["summary"]
        .clone()
}

/// Every entry under `root` but btm's own (`.btm/`, the journal), by
/// relative path.
fn entries(root: &Path) -> Vec<PathBuf> {
    let out = run(Command::new("find").arg(root).arg("-mindepth").arg("1"));
    let mut v: Vec<PathBuf> = out
        .lines()
        .map(|l| {
            Path::new(l)
                .strip_prefix(root)
                .expect("under root")
                .to_owned()
        })
        .filter(|p| !p.starts_with(".btm") && !p.starts_with(".btm-restore"))
        .collect();
    v.sort();
    v
}

/// `got` holds exactly what `want` holds (content, modes, times), and
/// every entry in it belongs to `owner`.
fn assert_restored(want: &Path, got: &Path, owner: (u32, u32)) {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(entries(want), entries(got));
    let diff = Command::new("diff")
        .args(["-r", "--no-dereference", "-x", ".btm", "-x", ".btm-restore"])
        .arg(want)
        .arg(got)
        .output()
        .expect("diff");
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    for rel in entries(want) {
        let (w, g) = (
            std::fs::symlink_metadata(want.join(&rel)).expect("want"),
            std::fs::symlink_metadata(got.join(&rel)).expect("got"),
        );
        assert_eq!(w.mode(), g.mode(), "{}", rel.display());
        if !w.is_dir() {
            assert_eq!(
                (w.mtime(), w.mtime_nsec()),
                (g.mtime(), g.mtime_nsec()),
                "{}",
                rel.display()
            );
        }
        assert_eq!((g.uid(), g.gid()), owner, "{}", rel.display());
    }
}

#[test]
fn every_manifest_renders_and_a_client_dry_run_accepts_it() {
    let root = deploy_dir();
    let found = run(Command::new("find")
        .arg(&root)
        .args(["-name", "kustomization.yaml"]));
    let mut dirs: Vec<PathBuf> = found
        .lines()
        .map(|l| Path::new(l).parent().expect("dir").to_owned())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 8, "{dirs:?}");
    let port = common::free_port();
    let mut stub = Command::new("/usr/bin/python3")
        .arg(kube_script("discovery.py"))
        .arg(port.to_string())
        .stdin(Stdio::null())
        .spawn()
        .expect("python3");
    wait_for("the discovery stub", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let out = tempfile::tempdir().expect("tmp");
    for dir in &dirs {
        let rel = dir
            .strip_prefix(&root)
            .expect("under")
            .to_str()
            .expect("utf8");
        let text = std::fs::read_to_string(dir.join("kustomization.yaml")).expect("read");
        let rendered = if text.contains("kind: Component") {
            rendered_component(rel)
        } else {
            render(rel, "")
        };
        let file = out.path().join(format!("{}.yaml", rel.replace('/', "_")));
        std::fs::write(&file, &rendered).expect("write");
        let applied = run(Command::new("kubectl")
            .args(["apply", "--dry-run=client", "--validate=false"])
            .arg(format!("--server=http://127.0.0.1:{port}"))
            .arg("-f")
            .arg(&file));
        let objects =
            rendered.matches("\nkind: ").count() + usize::from(rendered.starts_with("kind: "));
        assert_eq!(
            applied.matches("(dry run)").count(),
            objects,
            "{rel}: {applied}"
        );
        // Whatever runs btm runs it from our image, never as a shell.
        for line in rendered
            .lines()
            .filter(|l| l.contains("image: localhost/btm"))
        {
            assert!(line.trim().ends_with(":0.1.0"), "{rel}: {line}");
        }
    }
    let _ = stub.kill();
    let _ = stub.wait();
}

/// A component rendered onto a StatefulSet and a Deployment, and left off
/// a Deployment annotated `btm.io/restore: "false"`.
fn rendered_component(rel: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let workload = |kind: &str, name: &str, annotations: &str| {
        format!(
            "apiVersion: apps/v1\nkind: {kind}\nmetadata: {{name: {name}{annotations}}}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      containers: [{{name: node, image: node, volumeMounts: [{{name: data, mountPath: /data}}]}}]\n      volumes: [{{name: data, emptyDir: {{}}}}]\n"
        )
    };
    std::fs::write(dir.path().join("a.yaml"), workload("StatefulSet", "a", "")).expect("w");
    std::fs::write(dir.path().join("b.yaml"), workload("Deployment", "b", "")).expect("w");
    std::fs::write(
        dir.path().join("c.yaml"),
        workload(
            "Deployment",
            "c",
            ", annotations: {btm.io/restore: \"false\"}",
        ),
    )
    .expect("w");
    let up = "../".repeat(dir.path().components().count() - 1);
    let comp = deploy_dir().join(rel);
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "resources: [a.yaml, b.yaml, c.yaml]\ncomponents: [{up}{}]\nconfigMapGenerator:\n  - {{name: btm-restore, literals: [store=s3://bucket/node]}}\n",
            comp.to_str().expect("utf8").trim_start_matches('/')
        ),
    )
    .expect("kustomization");
    let rendered = run(Command::new("kubectl").arg("kustomize").arg(dir.path()));
    let docs: Vec<&str> = rendered.split("\n---\n").collect();
    let name = rel.rsplit('/').next().expect("name");
    for (doc, wanted) in docs.iter().map(|d| (d, !d.contains("btm.io/restore"))) {
        if doc.contains("kind: StatefulSet") || doc.contains("kind: Deployment") {
            assert_eq!(
                doc.contains(&format!("name: {name}")),
                wanted,
                "{rel}: {doc}"
            );
        }
    }
    rendered
}

#[test]
fn the_image_is_static_small_non_root_and_loads_as_oci_and_docker_archives() {
    let image = archive("BTM_IMAGE", "btm-image.tar (make image)");
    let size = std::fs::metadata(&image).expect("size").len();
    assert!(size <= 30 << 20, "{size} bytes: over 30 MB");
    let a = image.to_str().expect("utf8");
    for transport in ["oci-archive", "docker-archive"] {
        let out = run(Command::new("skopeo")
            .arg("inspect")
            .arg("--config")
            .arg(format!("{transport}:{a}")));
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let c = &v["config"];
        assert_eq!(c["User"], "65532:65532", "{transport}: {out}");
        assert_eq!(c["Entrypoint"][0], "/usr/local/bin/btm", "{transport}");
        for label in ["version", "source", "licenses", "revision"] {
            let key = format!("org.opencontainers.image.{label}");
            assert!(
                c["Labels"][&key].as_str().is_some_and(|s| !s.is_empty()),
                "{key}"
            );
        }
    }
    let podman = Podman::new();
    let version = podman.ok(&[
        "run",
        "--rm",
        "--read-only",
        "localhost/btm:0.1.0",
        "--version",
    ]);
    assert!(version.starts_with("btm 0.1.0"), "{version}");
    // No shell, no loader: only btm, its certificates and its user.
    let out = podman.output(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        "localhost/btm:0.1.0",
    ]);
    assert!(!out.status.success());
    let bad = podman.output(&[
        "run",
        "--rm",
        "--read-only",
        "localhost/btm:0.1.0",
        "restore",
        "latest",
        "/tmp/x",
        "-s",
        "/nonexistent",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent"), "{err}");
}

/// The bitcoin-core example with litecoind: the init container restores
/// the export as the pod's user (1000), is killed mid-restore with its pod
/// and resumes on the next play fetching less than the whole export, leaves
/// exactly the backup (content, modes, times) owned by that user, passes
/// without reading anything on a restart, and the node then starts on the
/// volume at the export's height, proven by `btm verify`.
#[test]
fn a_litecoind_pod_bootstraps_as_its_user_resumes_and_starts_verified() {
    let chain = Chain::start();
    let podman = Podman::new();
    let s3 = chain.s3.port;
    let settings = ["store=s3://ltc", "tag=ltc", "height=120"];
    let overlay = |restore: &[&str], node| {
        render(
            "examples/bitcoin-core",
            &node_overlay(&chain, s3, restore, node),
        )
    };

    // What a restore on the host fetches, for comparison.
    let reference = chain.dir.path().join("reference");
    let r = reference.to_str().expect("utf8");
    let full = chain
        .btm(&[
            "restore", "latest", r, "-s", "s3://ltc", "-t", "ltc", "--json",
        ])
        .ok();
    let full: serde_json::Value = serde_json::from_str(&full).expect("json");
    let full_bytes = full["summary"]["bytes_downloaded"].as_u64().expect("bytes");
    assert!(full_bytes > 20 << 20, "{full}");

    // Slowed to 2 MB/s, the pod is killed half way.
    let mut slow = settings.to_vec();
    slow.push("max-rate=2M");
    let mut play = podman.play_in_background(&playable(&overlay(&slow, NodeRuns::Nothing), true));
    wait_for(
        "the init container to start writing",
        Duration::from_secs(60),
        || {
            podman.state(INIT).is_some_and(|(s, _)| s == "running")
                && podman
                    .output(&["volume", "exists", VOLUME])
                    .status
                    .success()
                && podman.volume_dir(VOLUME).join(".btm-restore").exists()
        },
    );
    // Half the cold file is written.
    let extra = podman.volume_dir(VOLUME).join("regtest/extra.bin");
    wait_for("half the restore", Duration::from_secs(60), || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&extra).is_ok_and(|m| m.blocks() * 512 >= 16 << 20)
    });
    // Killed as a node's loss or an eviction kills it (podman's own `pod
    // rm` waits for the running `kube play`).
    let pid = podman.ok(&["inspect", "--format", "{{.State.Pid}}", INIT]);
    run(Command::new("kill").args(["-KILL", pid.trim()]));
    let _ = play.wait();
    podman.remove_pod(POD);
    let volume = podman.volume_dir(VOLUME);
    assert!(
        volume.join(".btm-restore").exists(),
        "the restore had finished: slow it more: {} {:?}",
        run(Command::new("ls").arg("-laR").arg(&volume)),
        podman.state(INIT)
    );

    // Played again (a restarted pod, the same claim): it resumes.
    let again = playable(&overlay(&settings, NodeRuns::Nothing), false);
    let out = podman.play(&again);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(podman.state(INIT), Some(("exited".into(), 0)));
    let s = summary(&podman);
    let fetched = s["bytes_downloaded"].as_u64().expect("bytes");
    assert!(
        fetched < full_bytes * 3 / 4,
        "fetched {fetched} of {full_bytes}: {s}"
    );
    assert!(
        s["chunks_reused"].as_u64() > Some(0) || s["files_trusted"].as_u64() > Some(0),
        "{s}"
    );
    assert_eq!(s["owners"], "restorer", "{s}");
    assert_restored(&reference, &volume, (1000, 1000));
    podman.remove_pod(POD);

    // A restart on a volume that holds the height reads nothing.
    let out = podman.play(&again);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&podman);
    assert_eq!(
        (s["bytes_downloaded"].as_u64(), s["bytes_verified"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    assert_eq!(s["files_known"], s["files"], "{s}");
    podman.remove_pod(POD);

    // The node itself on the volume: at the export's height, verified.
    let rpc = common::free_port();
    let out = podman.play(&playable(
        &overlay(&settings, NodeRuns::Litecoind(rpc)),
        false,
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("litecoind in the pod", Duration::from_secs(120), || {
        chain.try_cli(rpc, &["getblockcount"]).is_some()
    });
    assert_eq!(
        chain.try_cli(rpc, &["getblockcount"]).as_deref(),
        Some("120")
    );
    let verified = chain
        .btm(&[
            "verify",
            "latest",
            "-s",
            "s3://ltc",
            "-t",
            "ltc",
            "--rpc-url",
            &format!("http://127.0.0.1:{rpc}"),
            "--rpc-user",
            "btm",
        ])
        .ok();
    assert!(verified.starts_with("verified: "), "{verified}");
    assert!(verified.contains("chain regtest"), "{verified}");
    podman.remove_pod(POD);
}

/// Play `yaml` and check that the pod stopped at its init container: it
/// failed, the node container was made but never started, and the init
/// container's last log line is an error, which is returned.
#[track_caller]
fn stopped_at_init(podman: &Podman, yaml: &str, what: &str) -> String {
    let out = podman.play(yaml);
    assert!(!out.status.success(), "{what}: the pod started");
    let (status, code) = podman.state(INIT).expect("the init container ran");
    assert!(status == "exited" && code != 0, "{what}: {status} {code}");
    let node = podman.state(NODE).map(|s| s.0);
    assert_eq!(node.as_deref(), Some("created"), "{what}: the node ran");
    let logs = podman.logs(INIT);
    let last = logs.lines().last().unwrap_or_default().to_owned();
    eprintln!("{what}: {last}");
    assert!(last.starts_with("btm: error: "), "{what}: {logs}");
    last
}

/// Each bad setting stops the pod at its init container: the node
/// container is made but never started, the volume holds none of the
/// node's data (or, holding one chain, none of another's), and the init
/// container's last log line says why. A ConfigMap without the store stops
/// the pod before anything runs.
#[test]
fn a_bad_or_missing_snapshot_stops_the_pod_before_the_node_starts() {
    let chain = Chain::start();
    let keys = chain.dir.path();
    let public_key = |k: &str| {
        let out = chain
            .btm(&["key", "generate", keys.join(k).to_str().expect("utf8")])
            .ok();
        out.lines()
            .last()
            .expect("the public key")
            .trim()
            .to_owned()
    };
    public_key("publisher.key");
    let stranger = public_key("stranger.key");
    let publisher = keys.join("publisher.key");
    chain
        .btm(&[
            "publish",
            "-s",
            "s3://ltc",
            "--signing-key",
            publisher.to_str().expect("utf8"),
        ])
        .ok();
    let trust = format!("trust={stranger}");
    let closed = common::free_port();
    let s3 = chain.s3.port;
    let cases: [(&str, Vec<&str>, u16, &str); 4] = [
        (
            "another publisher's key",
            vec!["store=s3://ltc", "tag=ltc", &trust],
            s3,
            "signed",
        ),
        (
            "a height no backup has",
            vec!["store=s3://ltc", "tag=ltc", "height=1"],
            s3,
            "height",
        ),
        (
            "an unreachable store",
            vec!["store=s3://ltc", "tag=ltc"],
            closed,
            "reachable",
        ),
        (
            "an empty store",
            vec!["store=s3://empty", "tag=ltc"],
            s3,
            "no backup",
        ),
    ];
    let podman = Podman::new();
    for (what, restore, port, why) in cases {
        let yaml = playable(
            &render(
                "examples/bitcoin-core",
                &node_overlay(&chain, port, &restore, NodeRuns::Nothing),
            ),
            true,
        );
        let last = stopped_at_init(&podman, &yaml, what);
        assert!(last.contains(why), "{what}: {last}");
        assert!(
            !podman.volume_dir(VOLUME).join("regtest").exists(),
            "{what}: data written"
        );
        podman.remove_pod(POD);
        podman.ok(&["volume", "rm", "-f", VOLUME]);
    }
    // A volume that holds this chain, told to take another's backup:
    // refused as on the host, by the record the last restore left on it.
    let other = chain.dir.path().join("other-chain");
    std::fs::create_dir_all(&other).expect("mkdir");
    std::fs::write(other.join("state"), b"another chain").expect("w");
    let other_s = other.to_str().expect("utf8");
    chain
        .btm(&[
            "backup", other_s, "-s", "s3://ltc", "-t", "main", "--chain", "main",
        ])
        .ok();
    let restore = |tag: &str, first: bool| {
        let tag = format!("tag={tag}");
        playable(
            &render(
                "examples/bitcoin-core",
                &node_overlay(&chain, s3, &["store=s3://ltc", &tag], NodeRuns::Nothing),
            ),
            first,
        )
    };
    assert!(
        podman.play(&restore("ltc", true)).status.success(),
        "{}",
        podman.logs(INIT)
    );
    podman.remove_pod(POD);
    let last = stopped_at_init(&podman, &restore("main", false), "another chain");
    assert!(
        last.contains("refusing to restore") && last.contains("holds chain regtest"),
        "{last}"
    );
    assert!(
        !podman.volume_dir(VOLUME).join("state").exists(),
        "written over"
    );
    podman.remove_pod(POD);
    podman.ok(&["volume", "rm", "-f", VOLUME]);

    // No store in the ConfigMap: refused before any container runs, naming
    // the key.
    let yaml = playable(
        &render(
            "examples/bitcoin-core",
            &node_overlay(&chain, s3, &["tag=ltc"], NodeRuns::Nothing),
        ),
        true,
    );
    let out = podman.play(&yaml);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("no store: {}", err.trim());
    assert!(!out.status.success() && err.contains("store"), "{err}");
    assert!(
        podman
            .state(NODE)
            .is_none_or(|(s, _)| s != "running" && s != "exited"),
        "the node ran without a store"
    );
}

/// The export Job of examples/export-job on a volume standing in for the
/// snapshot's clone (the node's files, owned by its user, and a root-only
/// lost+found as an ext4 volume has): the backup appears in the store at
/// the height the ConfigMap gives, with the block the node has there.
#[test]
fn the_export_job_backs_up_a_volume_at_its_height() {
    let chain = Chain::start();
    let podman = Podman::new();
    podman.ok(&["volume", "create", "btm-export-source"]);
    let vol = podman.volume_dir("btm-export-source");
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", chain.clone_dir().display()))
        .arg(&vol));
    run(Command::new("chown").args(["-R", "1000:1000"]).arg(&vol));
    std::fs::create_dir(vol.join("lost+found")).expect("lost+found");
    std::fs::set_permissions(
        vol.join("lost+found"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let body = format!(
        r#"configMapGenerator:
  - name: btm-export
    behavior: replace
    literals: [store=s3://exports, tag=ltc-k8s, height=120, snapshot=bitcoin-data-20261206, "rpc-url=http://127.0.0.1:{rpc}", rpc-kind=bitcoin, rpc-user=btm]
  - name: btm-test-credentials
    literals: [{credentials}]
patches:
  - target: {{kind: Job, name: btm-export}}
    patch: |
      - {{op: add, path: /spec/template/spec/hostNetwork, value: true}}
      - {{op: replace, path: /spec/template/spec/restartPolicy, value: Never}}
      - {{op: replace, path: /spec/template/spec/containers/0/envFrom/0, value: {{configMapRef: {{name: btm-test-credentials}}}}}}
"#,
        rpc = chain.rpc_port,
        credentials = chain.credentials(chain.s3.port),
    );
    let rendered = render("examples/export-job", &body);
    // The claim is made from the snapshot the ConfigMap names (podman
    // makes a plain volume of it: the test filled it above).
    assert!(
        rendered.contains("    kind: VolumeSnapshot\n    name: bitcoin-data-20261206"),
        "the claim's snapshot: {rendered}"
    );
    let out = podman.play(&playable(&rendered, false));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = "btm-export-btm-export";
    wait_for("the export Job", Duration::from_secs(300), || {
        podman.state(job).is_some_and(|(s, _)| s == "exited")
    });
    assert_eq!(
        podman.state(job).map(|s| s.1),
        Some(0),
        "{}",
        podman.logs(job)
    );
    let listed = chain
        .btm(&["backups", "-s", "s3://exports", "-t", "ltc-k8s", "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let b = &v.as_array().expect("backups")[0];
    assert_eq!(b["meta"]["height"], 120, "{b}");
    assert_eq!(
        b["meta"]["chain"]["block_hash"].as_str(),
        Some(chain.cli(&["getblockhash", "120"]).as_str()),
        "{b}"
    );
    // The clone's files, all of them but the file system's own and the
    // wallet (key material never leaves the machine).
    let back = chain.dir.path().join("exported");
    let back_s = back.to_str().expect("utf8");
    chain
        .btm(&[
            "restore",
            "latest",
            back_s,
            "-s",
            "s3://exports",
            "-t",
            "ltc-k8s",
        ])
        .ok();
    assert!(!back.join("lost+found").exists());
    assert!(!back.join("regtest/wallets").exists());
    let kept: Vec<PathBuf> = entries(&vol)
        .into_iter()
        .filter(|p| !p.starts_with("lost+found") && !p.starts_with("regtest/wallets"))
        .collect();
    assert_eq!(entries(&back), kept);
}

/// The live variant of the bitcoin-core example (components/btm-live) under
/// podman, as far as podman 4.3 runs it. It refuses an init container with
/// a probe, so the native sidecar runs as an ordinary container of the pod
/// (`--sidecars-as-containers`): what is not exercised is Kubernetes
/// holding the node back until the startup probe passes. What is: the
/// sidecar's own spec (root, privileged, /dev/fuse, Bidirectional
/// propagation) serves the backup at once; the mount reaches the host's
/// volume and the node's container (HostToContainer); the probe's command
/// answers; on the pod's stop the sidecar, PID 1 of its container, gets
/// SIGTERM and, hydrated, finishes: a plain directory, exact. The plain
/// example's init container then finds the data complete and fetches
/// nothing.
#[test]
fn the_live_sidecar_serves_at_once_and_finishes_when_the_pod_stops() {
    let s3 = S3::start(&["live"]);
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("blocks")).expect("mkdir");
    common::live::write_noise(&src.join("blocks/blk00000.dat"), 24 << 20);
    std::fs::write(src.join("settings.json"), b"{}").expect("w");
    // Exported by the node's user (as the export Job does): its files.
    run(Command::new("chown").args(["-R", "1000:1000"]).arg(&src));
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let src_s = src.to_str().expect("utf8");
    common::btm_env(
        dir.path(),
        &["backup", src_s, "-s", "s3://live", "-t", "node"],
        &env,
    )
    .ok();
    let credentials: Vec<String> = s3.env().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let overlay = |node: &str, keep_inits: bool| {
        let args = format!("[\"{node}\"]");
        overlay_body(
            "store=s3://live, tag=node",
            &credentials.join(", "),
            "[sh, -c]",
            &args,
            keep_inits,
        )
    };
    // A node that stops when told.
    let node = "trap 'exit 0' TERM; while :; do sleep 0.2; done";
    let podman = Podman::new();
    podman.share_volumes();
    let live = render("examples/bitcoin-core/live", &overlay(node, false));
    let out = podman.play(&playable_with(&live, &["--sidecars-as-containers"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sidecar = "bitcoin-0-btm-live";
    wait_for("the live restore to serve", Duration::from_secs(60), || {
        podman.logs(sidecar).contains("ready: /data serves")
    });
    let volume = podman.volume_dir(VOLUME);
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(volume.to_str().expect("utf8")) && l.contains(" fuse")),
        "the mount did not reach the host: {mounts}"
    );
    let want = common::live::sha(&src.join("blocks/blk00000.dat"));
    let seen = podman.ok(&["exec", NODE, "sha256sum", "/data/blocks/blk00000.dat"]);
    assert!(seen.starts_with(&want), "the node reads {seen}, not {want}");
    // The startup probe's command, as the kubelet would run it.
    let status = podman.ok(&["exec", sidecar, "btm", "live", "status", "/data"]);
    assert!(status.contains("/data serves"), "{status}");
    wait_for("hydration", Duration::from_secs(120), || {
        podman
            .ok(&["exec", sidecar, "btm", "live", "status", "/data"])
            .contains("(hydrated)")
    });

    podman.ok(&["pod", "stop", "-t", "30", POD]);
    assert_eq!(
        podman.state(sidecar).map(|s| s.1),
        Some(0),
        "{}",
        podman.logs(sidecar)
    );
    assert!(
        podman
            .logs(sidecar)
            .contains("finished: /data is a plain directory"),
        "{}",
        podman.logs(sidecar)
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(
        !mounts.contains(volume.to_str().expect("utf8")),
        "still mounted: {mounts}"
    );
    assert!(!volume.join(".btm-live").exists());
    assert_restored(&src, &volume, (1000, 1000));
    podman.remove_pod(POD);

    // Switched to the plain example: its init container finds it complete.
    // The kubelet gives the volume's root to the pod's fsGroup on mount
    // (group-writable, setgid); podman does not, and left it to whichever
    // container mounted it first: done here as the kubelet would.
    run(Command::new("chown").arg("0:1000").arg(&volume));
    run(Command::new("chmod").arg("2775").arg(&volume));
    let plain = render("examples/bitcoin-core", &overlay(node, true));
    let out = podman.play(&playable(&plain, false));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        podman.logs(INIT)
    );
    let s = summary(&podman);
    assert_eq!(
        (s["chunks_fetched"].as_u64(), s["bytes_downloaded"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    podman.remove_pod(POD);
}
