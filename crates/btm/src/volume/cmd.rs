//! The single door through which btm runs `zfs` and `btrfs`.
//!
//! Every external command is built as an argument vector (never a shell
//! string, so a hostile name can never execute anything), logged, and its
//! stderr captured and classified into a [`CmdErrorKind`] here, once. Drivers
//! branch on the kind; nobody else matches on the tools' English messages.
//!
//! Every command is bounded in time ([`limit`]): on a suspended pool or a
//! frozen filesystem `zfs` and `btrfs` block in the kernel for good, and a
//! daemon waiting on one would never snapshot, prune, answer a height or
//! stop again. One limit serves the whole process, because every driver
//! call funnels through here; the program embedding the library sets it
//! ([`set_limit`]): the daemon from its configuration (`command_timeout`),
//! the `btm` command from `$BTM_COMMAND_TIMEOUT`.

use std::fmt;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::exec::Unfinished;

/// What went wrong with a command, as far as a caller needs to act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdErrorKind {
    /// The object named does not exist.
    NotFound,
    /// The object exists and cannot be changed right now; retrying may work.
    Busy,
    /// The object to create already exists.
    AlreadyExists,
    /// The installed tool does not know an option or syntax we used
    /// (zfs-fuse lacks several modern flags); a fallback may work.
    Unsupported,
    /// A snapshot that should be destroyed has dependent clones.
    HasClones,
    /// A rollback would need to destroy more recent snapshots.
    NewerSnapshotsExist,
    /// The target is not of the expected kind (not a subvolume, not a
    /// filesystem).
    WrongType,
    /// The caller lacks the privileges for this operation.
    PermissionDenied,
    /// It did not finish within [`limit`] and was killed: the pool may be
    /// suspended or the filesystem frozen. Whether it took effect is
    /// unknown until the volume is listed again.
    TimedOut,
    /// The program could not be started at all (not installed?).
    Spawn,
    /// The tool runs but its subsystem is not usable (no ZFS kernel module,
    /// zfs-fuse daemon not running): nothing can be said about the object.
    Unavailable,
    /// Any other failure.
    Other,
}

impl CmdErrorKind {
    /// Whether the same command may succeed if simply tried again later.
    pub fn is_temporary(self) -> bool {
        matches!(self, CmdErrorKind::Busy)
    }
}

/// A failed external command: what ran, how it ended, and what it said.
#[derive(Debug, Clone, thiserror::Error)]
pub struct CmdError {
    /// The argument vector, program first.
    pub argv: Vec<String>,
    /// Exit status, or `None` if killed by a signal or never started.
    pub status: Option<i32>,
    /// Captured standard error, trimmed.
    pub stderr: String,
    /// Classification of the failure.
    pub kind: CmdErrorKind,
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == CmdErrorKind::TimedOut {
            return write!(
                f,
                "`{}` did not finish within {:.0?} and was killed; is the pool suspended or the filesystem frozen?",
                self.argv.join(" "),
                limit()
            );
        }
        // Keep it to one line: zfs-fuse prints a 60-line usage text after an
        // unknown option, and the first few lines carry all the meaning.
        let mut lines = self.stderr.lines().map(str::trim).filter(|l| !l.is_empty());
        let head: Vec<&str> = lines.by_ref().take(3).collect();
        let rest = lines.count();
        let status = match self.status {
            Some(code) => format!("exit {code}"),
            None if self.kind == CmdErrorKind::Spawn => "could not start".to_owned(),
            None => "killed by signal".to_owned(),
        };
        write!(f, "`{}` failed ({status})", self.argv.join(" "))?;
        if !head.is_empty() {
            write!(f, ": {}", head.join("; "))?;
        }
        if rest > 0 {
            write!(f, " (+{rest} more lines)")?;
        }
        Ok(())
    }
}

/// The default [`limit`].
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(120);
/// Most bytes kept of a command's output (a listing of many thousand
/// snapshots is a few MiB).
const OUTPUT_LIMIT: u64 = 64 << 20;

static LIMIT_MS: AtomicU64 = AtomicU64::new(0);

/// How long any `zfs` or `btrfs` command may run: what [`set_limit`] set,
/// else [`DEFAULT_LIMIT`].
pub fn limit() -> Duration {
    match LIMIT_MS.load(Ordering::Relaxed) {
        0 => DEFAULT_LIMIT,
        ms => Duration::from_millis(ms),
    }
}

/// Set [`limit`] for every command this process runs from now on.
pub fn set_limit(limit: Duration) {
    LIMIT_MS.store(
        limit.as_millis().clamp(1, u128::from(u64::MAX)) as u64,
        Ordering::Relaxed,
    );
}

/// Run `program args…` and return its standard output on success.
///
/// Contract: no shell is involved; stdin is closed; stdout and stderr are
/// captured; a command still running after [`limit`] is killed and is
/// [`CmdErrorKind::TimedOut`]; a non-zero exit becomes a [`CmdError`]
/// carrying the argument vector, the status and stderr, classified by
/// [`classify`].
pub fn run<S: AsRef<str>>(program: &str, args: &[S]) -> Result<String, CmdError> {
    let argv: Vec<String> = std::iter::once(program.to_owned())
        .chain(args.iter().map(|a| a.as_ref().to_owned()))
        .collect();
    let started = Instant::now();
    tracing::debug!(command = %argv.join(" "), "running");
    let mut command = Command::new(program);
    command.args(&argv[1..]).env("LC_ALL", "C");
    let output = match crate::exec::run_bounded(&mut command, limit(), OUTPUT_LIMIT) {
        Ok(o) => o,
        Err(unfinished) => {
            let (stderr, kind) = match unfinished {
                Unfinished::Spawn(e) => (e.to_string(), CmdErrorKind::Spawn),
                Unfinished::Timeout => (String::new(), CmdErrorKind::TimedOut),
            };
            let err = CmdError {
                argv,
                status: None,
                stderr,
                kind,
            };
            if kind == CmdErrorKind::TimedOut {
                tracing::error!(error = %err, "command timed out");
            }
            return Err(err);
        }
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if output.status.success() {
        tracing::debug!(command = %argv.join(" "), duration_ms = elapsed_ms, "done");
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let kind = classify(&stderr);
    let err = CmdError {
        argv,
        status: output.status.code(),
        stderr,
        kind,
    };
    tracing::debug!(error = %err, duration_ms = elapsed_ms, "command failed");
    Err(err)
}

/// Map the stderr of `zfs`/`btrfs` (OpenZFS, zfs-fuse, btrfs-progs) to a kind.
///
/// Order matters: the most specific messages are tested first, because zfs
/// can say "dataset is busy" in a message that also names a missing object.
pub fn classify(stderr: &str) -> CmdErrorKind {
    let s = stderr.to_ascii_lowercase();
    let has = |needle: &str| s.contains(needle);
    if has("failed to initialize zfs library")
        || has("zfs-fuse daemon is running")
        || has("/dev/zfs")
    {
        CmdErrorKind::Unavailable
    } else if has("invalid option")
        || has("unrecognized option")
        || has("unknown option")
        || has("invalid dataset name")
    {
        CmdErrorKind::Unsupported
    } else if has("more recent snapshots exist") || has("more recent snapshots or bookmarks exist")
    {
        CmdErrorKind::NewerSnapshotsExist
    } else if has("dependent clones") || has("clones of previous snapshots exist") {
        CmdErrorKind::HasClones
    } else if has("already exists") || has("file exists") {
        CmdErrorKind::AlreadyExists
    } else if has("busy") {
        CmdErrorKind::Busy
    } else if has("does not exist") || has("no such file or directory") || has("not found") {
        CmdErrorKind::NotFound
    } else if has("not a btrfs subvolume")
        || has("not a btrfs filesystem")
        || has("operation not applicable")
        || has("not a filesystem")
    {
        CmdErrorKind::WrongType
    } else if has("permission denied") || has("operation not permitted") {
        CmdErrorKind::PermissionDenied
    } else {
        CmdErrorKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_real_messages() {
        let cases = [
            (
                "cannot open 'p/x': dataset does not exist",
                CmdErrorKind::NotFound,
            ),
            ("cannot destroy 'p/v': dataset is busy", CmdErrorKind::Busy),
            (
                "cannot create snapshot 'p/d@30': dataset already exists",
                CmdErrorKind::AlreadyExists,
            ),
            (
                "invalid option 'p'\nusage:\n\tlist [-rH]",
                CmdErrorKind::Unsupported,
            ),
            (
                "cannot open 'p/d@10,20': invalid dataset name",
                CmdErrorKind::Unsupported,
            ),
            (
                "cannot rollback to 'p/d@30': more recent snapshots exist\nuse '-r' to force",
                CmdErrorKind::NewerSnapshotsExist,
            ),
            (
                "cannot destroy 'p/d@20': snapshot has dependent clones",
                CmdErrorKind::HasClones,
            ),
            (
                "ERROR: Not a Btrfs subvolume: Invalid argument",
                CmdErrorKind::WrongType,
            ),
            (
                "ERROR: Could not statfs: No such file or directory",
                CmdErrorKind::NotFound,
            ),
            ("something odd", CmdErrorKind::Other),
            (
                "connect: No such file or directory\nPlease make sure that the zfs-fuse daemon is running.\ninternal error: failed to initialize ZFS library",
                CmdErrorKind::Unavailable,
            ),
            ("The ZFS modules are not loaded.\nTry running '/sbin/modprobe zfs' as root to load them.\n/dev/zfs and /proc/self/mounts are required.", CmdErrorKind::Unavailable),
        ];
        for (msg, kind) in cases {
            assert_eq!(classify(msg), kind, "{msg}");
        }
    }

    #[test]
    fn runs_without_shell_and_reports_failures() {
        // `;` would end a shell command; here it is one literal argument.
        let out = run("echo", &["a;", "touch", "/nonexistent-btm-test"]).expect("echo runs");
        assert_eq!(out.trim(), "a; touch /nonexistent-btm-test");
        let err = run("ls", &["/definitely/not/here/btm"]).expect_err("ls fails");
        assert_eq!(err.kind, CmdErrorKind::NotFound);
        assert_eq!(err.status, Some(2));
        assert!(err
            .to_string()
            .starts_with("`ls /definitely/not/here/btm` failed (exit 2)"));
        let err = run("btm-no-such-program", &[] as &[&str]).expect_err("cannot spawn");
        assert_eq!(err.kind, CmdErrorKind::Spawn);
    }
}
