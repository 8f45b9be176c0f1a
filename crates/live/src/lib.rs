//! Live restore: a node runs on a backup within seconds, whatever its
//! size, while the backup streams in underneath it.
//!
//! `btm restore --live` makes the backup's tree in the target directory
//! with every file a hole of its final size ([`skeleton`]), mounts a FUSE
//! file system over it ([`fs`]), and says it is ready. From then on the
//! node reads and writes through the mount: bytes already local come from
//! the backing file, bytes not yet local are fetched on demand, checked,
//! and written there first ([`files`]), while background hydration fetches
//! the rest the way a restore does ([`hydrate`]). `btm live finish`
//! unmounts once everything is local, and the directory is then a plain
//! directory: the backing tree was the target directory all along.
//!
//! Neither memory nor descriptors grow with the tree: what the server
//! knows of each file not yet local is a table on disk beside it
//! ([`table`]), in memory are two bits a chunk ([`presence`]), and backing
//! files are reached by file handle through bounded caches ([`backing`]).
//!
//! The layers: this crate depends on `btm-chunk` for the store, the chunk
//! map and the format, and on `fuser` for the kernel protocol. Above it,
//! `btm-daemon` reads running live restores' figures for its metrics and
//! `btm-cli` serves them. The pure decisions (which chunks a read, write
//! or truncate needs: [`presence`]; the order of hydration: [`order`]) are
//! property-tested on their own.

pub mod backing;
pub mod control;
pub mod durable;
pub mod files;
pub mod fs;
pub mod hydrate;
pub mod lru;
pub mod mount;
pub mod order;
pub mod presence;
pub mod serve;
pub mod skeleton;
pub mod source;
pub mod stats;
pub mod table;
pub mod target;

pub use serve::{serve, LiveOptions};
pub use stats::Status;
pub use target::open_target;

/// Why a live restore cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The target holds something that is not an unfinished live restore.
    #[error("{0} is not empty; a live restore needs an empty directory (a plain `btm restore` updates an existing node in place)")]
    NotEmpty(String),
    /// A FUSE file system (another live restore, say) serves the target.
    #[error("{0} is already a FUSE mount (is a live restore serving it? `btm live status` says); a live restore mounts over an empty directory (a plain `btm restore` updates an existing node in place)")]
    Mounted(String),
    /// FUSE is missing or not allowed.
    #[error("{0}; a plain `btm restore` works without it")]
    NoFuse(String),
    /// The target's file system, or this process, lacks what a live
    /// restore needs.
    #[error("{0}; a plain `btm restore` works without it")]
    Unsupported(String),
    /// The descriptor limit is too low even raised to its hard limit.
    #[error("this process may open only {0} files (ulimit -n); a live restore needs at least {min} whatever the tree's size: raise the hard limit (LimitNOFILE= in a unit, ulimit -Hn in a shell)", min = backing::MIN_OPEN_FILES)]
    Limit(u64),
    /// The target holds an unfinished live restore of another version.
    #[error("{dir} holds an unfinished live restore made by an earlier btm (state layout {version}); finish it with that version, or empty {dir} and start again")]
    OldState {
        /// The target.
        dir: String,
        /// The layout found.
        version: u32,
    },
    /// The target holds a live restore's state made on another tree.
    #[error("{0} holds the state of a live restore made in another directory or on another file system (copied or restored from an image?); its file handles are not good here: empty {0} and start again")]
    Moved(String),
    /// The target holds an unfinished live restore of another backup.
    #[error("{dir} holds an unfinished live restore of {found}, not {wanted}; run `btm restore --live {found} {dir}` to go on with it")]
    OtherBackup {
        /// The target.
        dir: String,
        /// The backup it holds.
        found: String,
        /// The backup asked for.
        wanted: String,
    },
    /// The store or backup failed.
    #[error(transparent)]
    Chunk(#[from] btm_chunk::ChunkError),
    /// A file system call on the target failed.
    #[error("{path}")]
    Io {
        /// The entry, relative to the target.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The live restore's own state could not be read or written.
    #[error("live restore state: {what}")]
    State {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A backup file's chunks are not laid out as this version expects.
    #[error("{0}: its chunks are not of the backup's chunk size; this backup cannot be served live (a plain `btm restore` can restore it)")]
    Layout(String),
    /// Mounting failed.
    #[error("cannot mount {dir}")]
    Mount {
        /// The target.
        dir: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Nothing serves the directory.
    #[error("no live restore serves {0}")]
    NotServing(String),
    /// The control socket failed.
    #[error("talking to the live restore of {dir}")]
    Control {
        /// The target.
        dir: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The server refused or failed to finish.
    #[error("{0}")]
    Refused(String),
    /// Stopped before everything was local.
    #[error(
        "stopped before the backup was wholly local ({0}); run the same command again to go on"
    )]
    Interrupted(&'static str),
}

impl LiveError {
    pub(crate) fn state(what: &'static str, source: std::io::Error) -> Self {
        LiveError::State { what, source }
    }
}

/// Bytes for people: `1.5 GiB`.
pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
