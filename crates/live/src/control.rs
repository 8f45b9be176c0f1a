//! How `btm live status` and `btm live finish` reach a running live
//! restore: a Unix socket under the runtime directory (`/run/btm/live/`,
//! or `$BTM_RUNTIME_DIR/live/`), named by the target directory, one JSON
//! line each way.
//!
//! The socket cannot live in the target directory: the mount covers it.
//!
//! Requests: `status` answers with one [`Status`] line. `finish` answers
//! with a [`Status`] line about every second while hydration goes on, then
//! one [`Finished`] line: done, or why not (the node still has files open,
//! say).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mount::absolute;
use crate::stats::Status;
use crate::LiveError;

/// Where control sockets live.
pub fn run_dir() -> PathBuf {
    btm::dirs::runtime_dir().join("live")
}

/// The last line `finish` answers with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finished {
    /// Whether the directory is now plain and the server is exiting.
    pub done: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One line of `finish`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum FinishLine {
    /// The end.
    Finished(Finished),
    /// Progress.
    Progress(Status),
}

/// The socket of the live restore serving `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    let abs = absolute(dir);
    let hash = blake3::hash(abs.as_os_str().as_encoded_bytes());
    run_dir().join(format!("{}.sock", &hash.to_hex()[..16]))
}

/// Listen for `dir`'s requests (a socket left by a killed server is
/// replaced).
pub fn listen(dir: &Path) -> Result<UnixListener, LiveError> {
    let path = socket_path(dir);
    let err = |source| LiveError::Control {
        dir: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(run_dir()).map_err(err)?;
    if UnixStream::connect(&path).is_ok() {
        return Err(LiveError::Mounted(dir.display().to_string()));
    }
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path).map_err(err)
}

/// Send `request` to the live restore of `dir` and hand each line of the
/// answer to `line` until it returns `false` or the answer ends.
pub fn ask(dir: &Path, request: &str, mut line: impl FnMut(&str) -> bool) -> Result<(), LiveError> {
    let path = socket_path(dir);
    let mut stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            LiveError::NotServing(dir.display().to_string())
        }
        _ => LiveError::Control {
            dir: dir.display().to_string(),
            source: e,
        },
    })?;
    let err = |source| LiveError::Control {
        dir: dir.display().to_string(),
        source,
    };
    writeln!(stream, "{request}").map_err(err)?;
    for l in BufReader::new(stream).lines() {
        let l = l.map_err(err)?;
        if !line(&l) {
            break;
        }
    }
    Ok(())
}

/// The status of the live restore serving `dir`.
pub fn status(dir: &Path) -> Result<Status, LiveError> {
    let mut got = None;
    ask(dir, "status", |l| {
        got = serde_json::from_str::<Status>(l).ok();
        false
    })?;
    got.ok_or_else(|| {
        LiveError::Refused(format!(
            "the live restore of {} gave no status",
            dir.display()
        ))
    })
}

/// The status of every live restore running on this machine (those whose
/// socket answers within a second), for the daemon's metrics.
pub fn statuses() -> Vec<Status> {
    let Ok(entries) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let Ok(mut s) = UnixStream::connect(e.path()) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(1)));
        if writeln!(s, "status").is_err() {
            continue;
        }
        let mut line = String::new();
        if BufReader::new(s).read_line(&mut line).is_ok() {
            if let Ok(st) = serde_json::from_str::<Status>(&line) {
                out.push(st);
            }
        }
    }
    out
}

/// Read one request line.
pub fn read_request(stream: &UnixStream) -> Option<String> {
    let mut l = String::new();
    BufReader::new(stream).read_line(&mut l).ok()?;
    Some(l.trim().to_owned())
}
