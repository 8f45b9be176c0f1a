//! Running commands the operator configured: snapshot hooks and the
//! `command` height source. Each gets a timeout after which it is killed;
//! a hung hook must never hang the daemon. The bounded run underneath
//! (`run_bounded`) is also what `zfs` and `btrfs` go through
//! ([`crate::volume::cmd`]): a suspended pool must not hang it either.

use std::fmt;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Most bytes kept from a command's stdout or stderr.
const OUTPUT_LIMIT: u64 = 64 * 1024;

/// How an operator command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ExecError {
    /// The argument vector.
    pub argv: Vec<String>,
    /// What happened.
    pub kind: ExecErrorKind,
}

/// The ways an operator command can fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecErrorKind {
    /// The argument vector was empty.
    Empty,
    /// It could not be started.
    Spawn(String),
    /// It ran longer than allowed and was killed.
    Timeout(Duration),
    /// It exited unsuccessfully.
    Failed {
        /// Exit code, or `None` if killed by a signal.
        code: Option<i32>,
        /// First line of its stderr.
        stderr: String,
    },
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cmd = self.argv.join(" ");
        match &self.kind {
            ExecErrorKind::Empty => write!(f, "empty command"),
            ExecErrorKind::Spawn(e) => write!(f, "`{cmd}` could not start: {e}"),
            ExecErrorKind::Timeout(d) => write!(f, "`{cmd}` timed out after {d:?} and was killed"),
            ExecErrorKind::Failed {
                code: Some(c),
                stderr,
            } if stderr.is_empty() => {
                write!(f, "`{cmd}` failed (exit {c})")
            }
            ExecErrorKind::Failed {
                code: Some(c),
                stderr,
            } => {
                write!(f, "`{cmd}` failed (exit {c}): {stderr}")
            }
            ExecErrorKind::Failed { code: None, .. } => write!(f, "`{cmd}` was killed by a signal"),
        }
    }
}

/// How a bounded run of a child ended without an exit status.
#[derive(Debug)]
pub(crate) enum Unfinished {
    /// It could not be started.
    Spawn(std::io::Error),
    /// It ran past its time and was killed (a process stuck in the kernel,
    /// as on a frozen filesystem or a suspended pool, dies only once the
    /// kernel lets it; a thread reaps it then).
    Timeout,
}

/// What a child that exited printed.
pub(crate) struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Run `cmd` with stdin closed, its output captured (at most `limit`
/// bytes of each stream), for at most `timeout`. The caller never waits
/// longer than that (plus a second for the kill to land): not for a child
/// stuck in the kernel, nor for a grandchild that keeps a pipe open.
pub(crate) fn run_bounded(
    cmd: &mut Command,
    timeout: Duration,
    limit: u64,
) -> Result<Finished, Unfinished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The command is killed if this thread exits first (a stop that does
    // not wait for a hung hook), rather than left orphaned.
    crate::sys::kill_when_parent_thread_exits(cmd);
    let mut child = cmd.spawn().map_err(Unfinished::Spawn)?;
    // Both pipes are drained on threads, so a chatty command cannot block
    // on a full pipe; results come back over channels, so nothing here
    // waits on a pipe past the deadline.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(r) = r {
                let _ = r.take(limit).read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let errs = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = match done.recv_timeout(timeout) {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(Unfinished::Spawn(e)),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = done.recv_timeout(Duration::from_secs(1));
            return Err(Unfinished::Timeout);
        }
    };
    let grace = Duration::from_millis(500);
    Ok(Finished {
        status,
        stdout: out.recv_timeout(grace).unwrap_or_default(),
        stderr: errs.recv_timeout(grace).unwrap_or_default(),
    })
}

/// Run `argv` with extra environment `env`, no stdin, and at most
/// `timeout`; return its stdout (first 64 KiB) on success. On timeout the
/// process is killed before this returns.
pub fn run(
    argv: &[String],
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<String, ExecError> {
    let err = |kind| ExecError {
        argv: argv.to_vec(),
        kind,
    };
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| err(ExecErrorKind::Empty))?;
    let mut cmd = Command::new(program);
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    let done = run_bounded(&mut cmd, timeout, OUTPUT_LIMIT).map_err(|e| match e {
        Unfinished::Spawn(e) => err(ExecErrorKind::Spawn(e.to_string())),
        Unfinished::Timeout => err(ExecErrorKind::Timeout(timeout)),
    })?;
    if done.status.success() {
        Ok(String::from_utf8_lossy(&done.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&done.stderr);
        Err(err(ExecErrorKind::Failed {
            code: done.status.code(),
            stderr: stderr.lines().next().unwrap_or_default().trim().to_owned(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn passes_env_and_returns_stdout() {
        let out = run(
            &argv(&["sh", "-c", "echo $BTM_HEIGHT"]),
            &[("BTM_HEIGHT", "42".into())],
            Duration::from_secs(5),
        )
        .expect("runs");
        assert_eq!(out.trim(), "42");
    }

    #[test]
    fn kills_on_timeout() {
        let started = std::time::Instant::now();
        let e =
            run(&argv(&["sleep", "10"]), &[], Duration::from_millis(200)).expect_err("times out");
        assert!(matches!(e.kind, ExecErrorKind::Timeout(_)));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_lingering_grandchild_does_not_block() {
        let started = std::time::Instant::now();
        let out = run(
            &argv(&["sh", "-c", "echo hi; sleep 30 &"]),
            &[],
            Duration::from_secs(5),
        )
        .expect("runs");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(out.is_empty() || out.trim() == "hi");
    }

    #[test]
    fn reports_failures() {
        let e = run(
            &argv(&["sh", "-c", "echo nope >&2; exit 3"]),
            &[],
            Duration::from_secs(5),
        )
        .expect_err("fails");
        assert_eq!(
            e.to_string(),
            "`sh -c echo nope >&2; exit 3` failed (exit 3): nope"
        );
        assert!(matches!(
            run(&[], &[], Duration::from_secs(1)).map_err(|e| e.kind),
            Err(ExecErrorKind::Empty)
        ));
        assert!(matches!(
            run(
                &argv(&["/nonexistent/btm-hook"]),
                &[],
                Duration::from_secs(1)
            )
            .map_err(|e| e.kind),
            Err(ExecErrorKind::Spawn(_))
        ));
    }
}
