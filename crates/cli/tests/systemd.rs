//! btm under a real systemd: the operator's path from the package to a
//! running service, in a Debian container booted with systemd as PID 1.
//!
//! The container is a debootstrapped bookworm root (`$BTM_TEST_ROOTFS`, a
//! tarball that scripts/test.sh builds once and caches) booted in new PID,
//! mount, UTS and IPC namespaces with `unshare` + `chroot` (systemd-nspawn
//! needs the host's system bus, which these machines lack). Inside it:
//! the package (`$BTM_PACKAGE`, made by `make pack` in scripts/test.sh, or
//! built here from the test binary) is installed with the seed's short
//! flags on a btrfs loop volume; the service must reach READY=1, take
//! snapshots on `btm notify`, log structured entries to journald, apply a
//! reload, stop cleanly, be restarted by systemd after `kill -9`, and
//! survive `install.sh --uninstall` with its snapshots. The .deb
//! (`$BTM_DEB`) is then installed and removed without starting anything.
//! Everything is torn down by PID afterwards, also on failure.
//!
//! Needs root. Fails, never skips, when the container cannot be booted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::sh;

/// A booted container; torn down on drop.
struct Container {
    dir: tempfile::TempDir,
    unshare: Child,
    pid1: i32,
    /// cgroup2 directories that systemd created and we remove afterwards.
    cgroups_before: Vec<PathBuf>,
}

fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| PathBuf::from(f[1]))
}

fn cgroup_dirs() -> Vec<PathBuf> {
    let Some(root) = cgroup2_root() else {
        return Vec::new();
    };
    std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn rmdir_tree(dir: &Path) {
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            if e.path().is_dir() {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Container {
    fn boot() -> Container {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the systemd test needs root (namespaces, loop devices)"
        );
        let tar = std::env::var_os("BTM_TEST_ROOTFS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/btm-test/bookworm-systemd-man.tar"));
        assert!(
            tar.is_file(),
            "no container root file system at {} (set BTM_TEST_ROOTFS, or run scripts/test.sh, which builds it with debootstrap)",
            tar.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("btm-systemd-")
            .tempdir_in("/var/tmp")
            .expect("tmp");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("mkdir");
        sh(
            "tar",
            &[
                "-xf",
                tar.to_str().expect("utf8"),
                "-C",
                root.to_str().expect("utf8"),
            ],
        );
        // The container's / must be traversable by its non-root services
        // (dbus), whatever mode the tarball's top entry carried.
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");

        // The node's volume: a btrfs loop image mounted inside the root.
        let mnt = root.join("srv/chain-fs");
        common::mount_btrfs_image(&dir.path().join("vol.img"), &mnt);
        sh(
            "btrfs",
            &[
                "subvolume",
                "create",
                mnt.join("data").to_str().expect("utf8"),
            ],
        );
        std::fs::write(mnt.join("data/state.db"), b"block 0").expect("write");

        let cgroups_before = cgroup_dirs();
        let r = root.to_str().expect("utf8");
        let script = format!(
            "set -e; mount --rbind {r} {r}; mount -t proc proc {r}/proc; \
             mount -t sysfs sysfs {r}/sys; mount -t cgroup2 cgroup2 {r}/sys/fs/cgroup; \
             mount -t tmpfs tmpfs {r}/run; mount -t tmpfs tmpfs {r}/tmp; \
             mount --rbind /dev {r}/dev; \
             exec chroot {r} /usr/bin/env -i container=other /lib/systemd/systemd"
        );
        let unshare = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--ipc",
                "--propagation",
                "private",
                "--kill-child",
            ])
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("boot.log")).expect("log"))
            .spawn()
            .expect("unshare");
        let mut c = Container {
            dir,
            unshare,
            pid1: 0,
            cgroups_before,
        };
        let started = Instant::now();
        while c.pid1 == 0 {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", c.unshare.id()))
                    .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                c.pid1 = pid;
            } else if started.elapsed() > Duration::from_secs(10) {
                panic!("the container did not start: {}", c.boot_log());
            } else {
                sleep(Duration::from_millis(20));
            }
        }
        // Wait for systemd to finish booting ("degraded" is fine: a minimal
        // root in a container has units that cannot start).
        for _ in 0..300 {
            let out = c.exec("systemctl is-system-running 2>/dev/null || true");
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                return c;
            }
            sleep(Duration::from_millis(100));
        }
        panic!(
            "systemd did not finish booting: {}\n{}",
            String::from_utf8_lossy(
                &c.exec("systemctl list-jobs; systemctl --failed; ls -ld / /usr /usr/share /usr/share/dbus-1 /usr/share/dbus-1/system.d; journalctl -b -u dbus --no-pager | tail -5")
                    .stdout
            ),
            c.boot_log()
        );
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn boot_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("boot.log")).unwrap_or_default()
    }

    /// Run `sh -c CMD` inside the container, as root.
    fn exec(&self, cmd: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid1.to_string(), "-p", "-m", "-u", "-i"])
            .arg("chroot")
            .arg(self.root())
            .args([
                "/usr/bin/env",
                "-i",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C",
            ])
            .args(["sh", "-c", cmd])
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// Run CMD inside; panic with its output unless it succeeds; stdout.
    #[track_caller]
    fn ok(&self, cmd: &str) -> String {
        let out = self.exec(cmd);
        assert!(
            out.status.success(),
            "`{cmd}` failed ({}):\n{}{}\n--- journal ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(
                &self
                    .exec("journalctl -u btm-daemon --no-pager | tail -30")
                    .stdout
            )
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Wait up to `limit` for `cmd` to succeed.
    #[track_caller]
    fn wait_for(&self, what: &str, limit: Duration, cmd: &str) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.exec(cmd).status.success() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what} (`{cmd}`):\n{}",
            String::from_utf8_lossy(
                &self
                    .exec("systemctl status btm-daemon --no-pager; journalctl -u btm-daemon --no-pager | tail -30")
                    .stdout
            )
        );
    }

    fn show(&self, prop: &str) -> String {
        self.ok(&format!("systemctl show -P {prop} btm-daemon"))
            .trim()
            .to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGKILL to PID 1 of a PID namespace ends every process in it.
        if self.pid1 > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid1),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        let mnt = self.root().join("srv/chain-fs");
        for _ in 0..40 {
            let ok = Command::new("umount")
                .arg(&mnt)
                .status()
                .is_ok_and(|s| s.success());
            if ok || !is_mounted(&mnt) {
                break;
            }
            sleep(Duration::from_millis(250));
        }
        if is_mounted(&mnt) {
            let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        }
        // The killed processes leave their cgroups asynchronously.
        for _ in 0..40 {
            let left: Vec<PathBuf> = cgroup_dirs()
                .into_iter()
                .filter(|d| !self.cgroups_before.contains(d))
                .collect();
            if left.is_empty() {
                break;
            }
            for dir in &left {
                rmdir_tree(dir);
            }
            sleep(Duration::from_millis(250));
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == path.to_str())
}

/// The package to install: `$BTM_PACKAGE`, or one made from the test binary
/// with the same script `make pack` uses.
fn package(scratch: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("BTM_PACKAGE") {
        return PathBuf::from(p);
    }
    let out = scratch.join("btm_package.tar.gz");
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    sh(
        root.join("scripts/pack.sh").to_str().expect("utf8"),
        &[
            "--bin",
            env!("CARGO_BIN_EXE_btm"),
            "--out",
            out.to_str().expect("utf8"),
        ],
    );
    out
}

fn deb(scratch: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("BTM_DEB") {
        return PathBuf::from(p);
    }
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    sh(
        root.join("packaging/build-deb.sh").to_str().expect("utf8"),
        &[
            "--bin",
            env!("CARGO_BIN_EXE_btm"),
            "--out",
            scratch.to_str().expect("utf8"),
        ],
    );
    std::fs::read_dir(scratch)
        .expect("ls")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb")
}

fn snapshots(c: &Container) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(c.root().join("srv/chain-fs"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("data@"))
        .collect();
    v.sort();
    v
}

/// Bash completes `btm roll` to `rollback` with the installed completion
/// script (what pressing TAB runs).
const COMPLETE_ROLL: &str = "bash -c 'source /usr/local/share/bash-completion/completions/btm && COMP_WORDS=(btm roll) && COMP_CWORD=1 && _btm btm roll btm && printf \"%s\\n\" \"${COMPREPLY[@]}\"' | grep -qx rollback";

#[test]
fn the_package_installs_and_runs_under_systemd() {
    let c = Container::boot();
    let scratch = c.dir.path().to_owned();
    std::fs::copy(package(&scratch), c.root().join("root/btm_package.tar.gz")).expect("copy");

    // The seed's short style, as an operator would type it.
    let out = c.ok(
        "cd /root && tar -xzf btm_package.tar.gz && cd btm_package && \
         ./install.sh -i=10 -c=3 -m=btrfs -a=fair -p=/srv/chain-fs/data",
    );
    assert!(out.contains("active (running)"), "{out}");
    c.ok("systemd-analyze verify /etc/systemd/system/btm-daemon.service");
    // The live-restore template is installed beside it, and valid.
    c.ok("systemd-analyze verify btm-live@node.service");
    assert_eq!(c.show("Type"), "notify");
    assert_eq!(c.show("NotifyAccess"), "main");
    assert_eq!(c.show("ActiveState"), "active");
    // Active only after READY=1: the "ready" log entry precedes the moment
    // systemd marked the unit active.
    let ready_us: u64 = c
        .ok("journalctl -u btm-daemon -o json --no-pager | grep '\"btm daemon ready\"' | head -n 1")
        .split("\"__REALTIME_TIMESTAMP\":\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .expect("the ready entry");
    let active_us: u64 = c
        .ok("date -d \"$(systemctl show -P ActiveEnterTimestamp btm-daemon)\" +%s%6N")
        .trim()
        .parse()
        .expect("timestamp");
    assert!(
        ready_us <= active_us + 1_000_000,
        "active at {active_us} before READY at {ready_us}"
    );

    // Heights pushed by the node become snapshots; journald has the fields.
    for h in [10, 20, 30, 40] {
        c.ok(&format!(
            "echo 'block {h}' > /srv/chain-fs/data/state.db; btm notify --height {h}"
        ));
    }
    assert_eq!(snapshots(&c), ["data@20", "data@30", "data@40"], "cap 3");
    let entries = c.ok("journalctl -u btm-daemon -o json --no-pager");
    let taken = entries
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["MESSAGE"] == "snapshot taken" && e["HEIGHT"] == "40")
        .unwrap_or_else(|| panic!("no structured 'snapshot taken' entry for 40:\n{entries}"));
    assert_eq!(taken["VOLUME"], "/srv/chain-fs/data", "{taken}");
    assert_eq!(taken["SNAPSHOT"], "/srv/chain-fs/data@40", "{taken}");
    assert!(taken["DURATION_MS"].is_string(), "{taken}");

    // A reload applies a changed configuration without a restart.
    let pid = c.show("MainPID");
    c.ok("sed -i 's/^cap = 3$/cap = 2/' /etc/btm/btm.toml && systemctl reload btm-daemon");
    c.wait_for(
        "the reload",
        Duration::from_secs(10),
        "btm status --json | grep -q '\"cap\":2'",
    );
    assert_eq!(c.show("MainPID"), pid, "a reload must not restart");
    c.ok("btm notify --height 50");
    assert_eq!(snapshots(&c), ["data@40", "data@50"], "cap 2 after reload");
    // A broken file is refused and the running configuration stays.
    c.ok("cp /etc/btm/btm.toml /root/good.toml && echo 'itvv = 3' >> /etc/btm/btm.toml && systemctl reload btm-daemon");
    sleep(Duration::from_millis(500));
    assert_eq!(c.show("ActiveState"), "active");
    c.ok("journalctl -u btm-daemon --no-pager | grep -q 'new configuration rejected'");
    c.ok("cp /root/good.toml /etc/btm/btm.toml");

    // Stop: clean exit, status 0.
    c.ok("systemctl stop btm-daemon");
    assert_eq!(c.show("ActiveState"), "inactive");
    assert_eq!(c.show("Result"), "success");
    assert_eq!(c.show("ExecMainStatus"), "0");
    assert!(
        !c.root().join("run/btm/btm.sock").exists(),
        "socket left behind"
    );

    // kill -9: systemd restarts it.
    c.ok("systemctl start btm-daemon");
    let before = c.show("MainPID");
    c.ok(&format!("kill -9 {before}"));
    c.wait_for(
        "the restart after kill -9",
        Duration::from_secs(20),
        &format!("[ \"$(systemctl show -P MainPID btm-daemon)\" != {before} ] && [ \"$(systemctl show -P MainPID btm-daemon)\" != 0 ] && systemctl is-active --quiet btm-daemon"),
    );
    assert_eq!(c.show("NRestarts"), "1");
    c.ok("btm notify --height 60");

    // Installing again is harmless; uninstalling keeps config and snapshots.
    let again = c.ok(
        "cd /root/btm_package && ./install.sh -i=10 -c=2 -m=btrfs -a=fair -p=/srv/chain-fs/data",
    );
    assert!(again.contains("already up to date"), "{again}");
    // The Cosmovisor hook comes with it (docs/cosmovisor.md), and the man
    // pages and completions work as an operator uses them.
    c.ok("test -x /usr/local/lib/btm/btm-preupgrade.sh");
    c.ok("MANPAGER=cat man btm-rollback | grep -q 'Roll the volume back to a snapshot'");
    c.ok("MANPAGER=cat man btm | grep -q 'btm-rollback'");
    c.ok(COMPLETE_ROLL);
    // A different value: the existing configuration is kept, the change shown.
    let config = c.ok("cat /etc/btm/btm.toml");
    let kept = c.ok(
        "cd /root/btm_package && ./install.sh -i=10 -c=5 -m=btrfs -a=fair -p=/srv/chain-fs/data",
    );
    assert!(kept.contains("exists and is kept"), "{kept}");
    assert!(
        kept.contains("-cap = 2") && kept.contains("+cap = 5"),
        "{kept}"
    );
    assert_eq!(c.ok("cat /etc/btm/btm.toml"), config);
    let dry = c.ok(
        "cd /root/btm_package && ./install.sh -i=10 -c=5 -m=btrfs -a=fair -p=/srv/chain-fs/data --force --dry-run",
    );
    assert!(dry.contains("+ install -m 0644"), "{dry}");
    assert_eq!(c.ok("cat /etc/btm/btm.toml"), config, "a dry run wrote");
    let forced = c.ok(
        "cd /root/btm_package && ./install.sh --snapshot-itv=10 --snapshot-cap=5 --snapshot-mode=btrfs --snapshot-algo=fair --snapshot-target=/srv/chain-fs/data --force",
    );
    assert!(forced.contains("will change"), "{forced}");
    c.wait_for(
        "the restart into the new configuration",
        Duration::from_secs(10),
        "btm status --json | grep -q '\"cap\":5'",
    );
    c.ok("cd /root/btm_package && ./install.sh --uninstall");
    assert!(!c.root().join("usr/local/bin/btm").exists());
    assert!(!c
        .root()
        .join("usr/local/lib/btm/btm-preupgrade.sh")
        .exists());
    assert!(!c
        .root()
        .join("usr/local/share/man/man1/btm-rollback.1")
        .exists());
    assert!(!c
        .root()
        .join("etc/systemd/system/btm-daemon.service")
        .exists());
    assert!(c.root().join("etc/btm/btm.toml").exists());
    assert_eq!(c.show("LoadState"), "not-found");
    assert_eq!(snapshots(&c), ["data@50", "data@60"]);

    // The .deb: installs the unit and the conffile, starts nothing.
    std::fs::copy(deb(&scratch), c.root().join("root/btm.deb")).expect("copy");
    c.ok("rm /etc/btm/btm.toml && dpkg -i /root/btm.deb");
    assert_eq!(c.show("LoadState"), "loaded");
    assert_eq!(c.show("ActiveState"), "inactive");
    assert_eq!(c.show("UnitFileState"), "disabled");
    c.ok("/usr/bin/btm --version && test -f /etc/btm/btm.toml");
    c.ok("test -x /usr/lib/btm/btm-preupgrade.sh");
    c.ok("MANPAGER=cat man btm-rollback | grep -q 'Roll the volume back to a snapshot'");
    c.ok(&COMPLETE_ROLL.replace("/usr/local/share", "/usr/share"));
    c.ok("test -f /usr/share/btm/monitoring/btm-alerts.yml && test -f /usr/share/btm/monitoring/btm-dashboard.json");
    c.ok("systemd-analyze verify /lib/systemd/system/btm-daemon.service");
    c.ok("dpkg -r btm");
    assert!(!c.root().join("usr/bin/btm").exists());
    assert!(
        c.root().join("etc/btm/btm.toml").exists(),
        "remove keeps conffiles"
    );
    assert_eq!(snapshots(&c), ["data@50", "data@60"]);
}

/// `n` small files under `dir`, in directories of 500.
fn small_tree(dir: &Path, n: usize) {
    for i in 0..n {
        let sub = dir.join(format!("d{:02}", i / 500));
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(
            sub.join(format!("f{i:05}")),
            format!("file {i}\n").repeat(3),
        )
        .expect("w");
    }
}

#[test]
fn the_live_restore_unit_serves_under_systemd_at_a_limit_of_1024() {
    let c = Container::boot();
    let scratch = c.dir.path().to_owned();
    // The backup, made on the host into a store the container sees at
    // /srv/store: 3,000 files, more than the limit of 1024 descriptors.
    let src = scratch.join("src");
    small_tree(&src.join("state"), 3000);
    std::fs::write(src.join("blocks.dat"), vec![7u8; 3 << 20]).expect("w");
    let store = c.root().join("srv/store");
    common::btm(
        &scratch,
        &[
            "backup",
            src.to_str().expect("utf8"),
            "-s",
            store.to_str().expect("utf8"),
            "-t",
            "node",
        ],
    )
    .ok();
    // The package's binary and template, as install.sh lays them out.
    std::fs::copy(package(&scratch), c.root().join("root/btm_package.tar.gz")).expect("copy");
    c.ok("cd /root && tar -xzf btm_package.tar.gz && \
         install -m 0755 btm_package/btm /usr/local/bin/btm && \
         install -m 0644 'btm_package/btm-live@.service' /etc/systemd/system/");
    c.ok(
        "mkdir -p /etc/btm/live && printf 'BTM_STORE=/srv/store\\nBTM_LIVE_DIR=/srv/node\\nBTM_LIVE_TAG=node\\n' > /etc/btm/live/node.env",
    );
    // Whatever the unit asks for, a limit of 1024, soft and hard: the
    // server depends on neither.
    c.ok(
        "mkdir -p /etc/systemd/system/btm-live@node.service.d && \
         printf '[Service]\\nLimitNOFILE=1024\\n' > /etc/systemd/system/btm-live@node.service.d/limit.conf && \
         systemctl daemon-reload",
    );
    let show = |p: &str| {
        c.ok(&format!("systemctl show -P {p} btm-live@node"))
            .trim()
            .to_owned()
    };
    // Type=notify: `start` returns once the mount serves the whole tree.
    c.ok("systemctl start btm-live@node");
    assert_eq!(show("ActiveState"), "active");
    assert_eq!(show("LimitNOFILE"), "1024");
    let pid = show("MainPID");
    let limits = c.ok(&format!("grep 'open files' /proc/{pid}/limits"));
    assert!(
        limits.split_whitespace().filter(|w| *w == "1024").count() == 2,
        "{limits}"
    );
    c.ok("mountpoint -q /srv/node && test \"$(find /srv/node/state -type f | wc -l)\" = 3000");
    assert_eq!(
        c.ok("cat /srv/node/state/d05/f02999"),
        "file 2999\n".repeat(3)
    );
    let fds = c.ok(&format!("ls /proc/{pid}/fd | wc -l"));
    assert!(fds.trim().parse::<u32>().expect("count") < 1024, "{fds}");
    let status = c.ok("btm live status /srv/node");
    assert!(status.contains("serves"), "{status}");
    c.ok("btm live finish /srv/node");
    c.wait_for(
        "the unit to end after finish",
        Duration::from_secs(30),
        "! systemctl is-active --quiet btm-live@node",
    );
    assert_eq!(
        show("Result"),
        "success",
        "{}",
        c.ok("journalctl -u btm-live@node --no-pager | tail -20")
    );
    c.ok("! mountpoint -q /srv/node && test ! -e /srv/node/.btm-live");
    let same = Command::new("diff")
        .arg("-r")
        .arg(&src)
        .arg(c.root().join("srv/node"))
        .status()
        .expect("diff");
    assert!(same.success(), "the finished tree differs from the source");
    // Finished: a later start of the unit is skipped, not failed, and the
    // node starts on its plain directory.
    c.ok("systemctl start btm-live@node");
    assert_eq!(show("ActiveState"), "inactive");
    assert_ne!(show("Result"), "exit-code");
}
