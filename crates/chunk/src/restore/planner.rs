//! The planner stage (the calling thread): it streams the backup's
//! entries, makes directories and symlinks, opens and sizes each file, and
//! decides per chunk what to do with it ([`crate::plan::restore_step`]).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};

use super::fetch::{BatchMsg, Want};
use super::journal::{Prior, Stamp};
use super::write::{FileJob, Origin};
use super::{RestoreSummary, Shared, BIG_FILE_CHUNKS};
use crate::format::tree::{ChunkRef, Entry, EntryKind, Item};
use crate::inventory;
use crate::localfs::{split_name, symlink_owner_and_times, Found, DIR_FLAGS};
use crate::pipeline::{Budget, Permit};
use crate::plan::{append_trusted_end, restore_step, restore_step_known, RestoreStep};
use crate::spool::Spool;
use crate::store::Id;
use crate::ChunkError;

pub(super) struct Planner<'p, 'a> {
    pub(super) shared: &'a Shared<'a>,
    pub(super) tree: &'p btm::confined::Tree,
    pub(super) dest: &'p Path,
    pub(super) prior: &'p Prior,
    /// Files open at once.
    pub(super) open_files: &'a Budget,
    pub(super) verify: Sender<Want<'a>>,
    pub(super) batch: Sender<BatchMsg<'a>>,
    /// The directories on the path to the current entry, open.
    pub(super) stack: Vec<OpenDir>,
    /// The destination held nothing when the restore began (see
    /// [`OpenDir::fresh`]).
    pub(super) root_fresh: bool,
    /// Files that hard links may name and the filter left out.
    pub(super) left_out: HashSet<Vec<u8>>,
    pub(super) dirs: &'p mut Vec<Entry>,
    pub(super) summary: &'p mut RestoreSummary,
}

/// A directory on the way to the current entry, open.
pub(super) struct OpenDir {
    path: Vec<u8>,
    fd: Arc<OwnedFd>,
    /// This restore made it (or found the destination empty): its
    /// entries are created with `O_EXCL` and nothing is looked at first.
    /// Only a hint: an entry someone else put there meanwhile makes
    /// `O_EXCL` fail, and that entry then takes the careful path.
    fresh: bool,
}

/// The file whose chunks are being planned: its job, the index of its
/// next chunk, and how many of its leading bytes are trusted.
struct Current<'a> {
    job: Arc<FileJob<'a>>,
    next: u64,
    trusted: u64,
    /// What the local file holds, if a record says so: chunks that are
    /// the same are kept unread, the others fetched without comparing.
    known: Option<Arc<[ChunkRef]>>,
    /// Its chunks so far, journalled with it once complete.
    chunks: Vec<ChunkRef>,
    /// It has more than [`RECORDED_CHUNKS`]: journalled without them.
    unrecorded: bool,
}

impl Current<'_> {
    /// Keep chunk `c` for the journal, up to [`RECORDED_CHUNKS`].
    fn note(&mut self, c: ChunkRef) {
        if self.unrecorded {
            return;
        }
        if self.chunks.len() < RECORDED_CHUNKS {
            self.chunks.push(c);
        } else {
            self.chunks = Vec::new();
            self.unrecorded = true;
        }
    }
}

/// The most chunks a journal line lists (64 GiB of 1 MiB chunks: 2.5 MiB
/// in memory, 5 MiB of line): a larger file is compared by reading it,
/// as without a record.
const RECORDED_CHUNKS: usize = 1 << 16;

impl<'a> Planner<'_, 'a> {
    fn refused(&self, e: &Entry, detail: impl Into<String>) -> ChunkError {
        ChunkError::Refused {
            path: e.display().into_owned(),
            detail: detail.into(),
        }
    }

    fn io(&self, e: &Entry, err: impl Into<std::io::Error>) -> ChunkError {
        ChunkError::io(&self.dest.join(OsStr::from_bytes(&e.path)), err.into())
    }

    /// The open directory that holds `path`, and whether it is fresh
    /// ([`OpenDir::fresh`]).
    fn parent(&mut self, e: &Entry) -> Result<(Arc<OwnedFd>, bool), ChunkError> {
        let (parent, _) = split_name(&e.path);
        if parent.is_empty() {
            self.stack.clear();
            let fd = self
                .tree
                .fd()
                .try_clone_to_owned()
                .map_err(|x| self.io(e, x))?;
            return Ok((Arc::new(fd), self.root_fresh));
        }
        while let Some(d) = self.stack.last() {
            let p = &d.path;
            if p == parent || parent.starts_with(&[&p[..], b"/"].concat()) {
                break;
            }
            self.stack.pop();
        }
        if let Some(d) = self.stack.last() {
            if d.path == parent {
                return Ok((Arc::clone(&d.fd), d.fresh));
            }
        }
        // Not on the way (format 1 lists entries in any parent-first
        // order): open it component by component.
        let rel = Path::new(OsStr::from_bytes(parent));
        let comps = btm::confined::components(rel).map_err(|x| self.refused(e, x.to_string()))?;
        let fd = self
            .tree
            .dir(&comps, false)
            .map_err(|x| self.refused(e, x.to_string()))?;
        Ok((Arc::new(fd), false))
    }

    pub(super) fn run(&mut self, mut entries: inventory::Entries<'_>) -> Result<(), ChunkError> {
        let mut current: Option<Current<'a>> = None;
        let mut append: Option<AppendCheck> = None;
        loop {
            if self.shared.pipeline.aborted() {
                return Err(ChunkError::Aborted);
            }
            let Some(item) = entries.next_item()? else {
                break;
            };
            match item {
                Item::Chunks(chunks) => {
                    if let Some(f) = current.as_mut() {
                        for c in chunks {
                            f.note(c);
                            if let Some(known) = &f.known {
                                let recorded =
                                    usize::try_from(f.next).ok().and_then(|i| known.get(i));
                                self.step(&f.job, f.next, restore_step_known(&c, recorded))?;
                            } else {
                                self.chunk(&f.job, f.next, c, f.trusted, &mut append)?;
                            }
                            f.next += 1;
                        }
                    }
                }
                Item::Entry(e) => {
                    self.finish_file(current.take(), &mut append)?;
                    let selected =
                        self.shared.opts.filter.as_ref().is_none_or(|re| {
                            re.is_match(&e.path) || matches!(e.kind, EntryKind::Dir)
                        });
                    if !selected {
                        if e.linked {
                            self.left_out.insert(e.path);
                        }
                        continue;
                    }
                    match &e.kind {
                        EntryKind::Dir => self.dir(e)?,
                        EntryKind::Symlink { target } => self.symlink(&e, target)?,
                        EntryKind::Link { target } => self.link(&e, target)?,
                        EntryKind::File { size } => {
                            let size = *size;
                            current = self.file(e, size, &mut append)?;
                        }
                    }
                }
            }
        }
        self.finish_file(current.take(), &mut append)
    }

    fn dir(&mut self, e: Entry) -> Result<(), ChunkError> {
        let (parent, parent_fresh) = self.parent(&e)?;
        let (_, name) = split_name(&e.path);
        let name = OsStr::from_bytes(name);
        let mkdir =
            || nix::sys::stat::mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o700));
        // In a fresh directory there is nothing to look at first: make it,
        // and take the careful path only if something is there after all.
        let made = parent_fresh && mkdir().is_ok();
        let fresh = made
            || match fstatat(parent.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if kind(st.st_mode) == SFlag::S_IFDIR => false,
                Ok(_) => {
                    // A file or symlink where the backup has a directory: the
                    // link itself goes, never what it points to.
                    nix::unistd::unlinkat(
                        parent.as_fd(),
                        name,
                        nix::unistd::UnlinkatFlags::NoRemoveDir,
                    )
                    .map_err(|x| self.io(&e, x))?;
                    mkdir().map_err(|x| self.io(&e, x))?;
                    true
                }
                Err(nix::errno::Errno::ENOENT) => {
                    mkdir().map_err(|x| self.io(&e, x))?;
                    true
                }
                Err(x) => return Err(self.io(&e, x)),
            };
        let fd = openat(parent.as_fd(), name, DIR_FLAGS, Mode::empty()).map_err(|x| match x {
            nix::errno::Errno::ELOOP => self.refused(&e, "a symlink appeared in its place"),
            x => self.io(&e, x),
        })?;
        self.stack.push(OpenDir {
            path: e.path.clone(),
            fd: Arc::new(fd),
            fresh,
        });
        self.dirs.push(e);
        Ok(())
    }

    fn symlink(&mut self, e: &Entry, target: &[u8]) -> Result<(), ChunkError> {
        let (parent, _) = self.parent(e)?;
        let (_, name) = split_name(&e.path);
        let name = OsStr::from_bytes(name);
        let current = nix::fcntl::readlinkat(parent.as_fd(), name).ok();
        if current.as_deref().map(|t| t.as_bytes()) != Some(target) {
            match fstatat(parent.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if kind(st.st_mode) == SFlag::S_IFDIR => {
                    return Err(self.refused(
                        e,
                        "the backup has a symlink here, but a directory exists; remove it first",
                    ))
                }
                Ok(_) => nix::unistd::unlinkat(
                    parent.as_fd(),
                    name,
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .map_err(|x| self.io(e, x))?,
                Err(_) => {}
            }
            nix::unistd::symlinkat(OsStr::from_bytes(target), parent.as_fd(), name)
                .map_err(|x| self.io(e, x))?;
        }
        symlink_owner_and_times(parent.as_fd(), name, e, self.shared.opts.owners)
            .map_err(|x| self.io(e, x))?;
        Ok(())
    }

    /// Make `e` a hard link to the file restored at `target` (one inode),
    /// unless it already is one.
    fn link(&mut self, e: &Entry, target: &[u8]) -> Result<(), ChunkError> {
        if self.left_out.contains(target) {
            return Err(self.refused(
                e,
                format!(
                    "it is a hard link to {}, which the filter leaves out; select that too",
                    String::from_utf8_lossy(target)
                ),
            ));
        }
        let (parent, fresh) = self.parent(e)?;
        let name = OsStr::from_bytes(split_name(&e.path).1);
        let (target_dir, target_name) = split_name(target);
        let comps = btm::confined::components(Path::new(OsStr::from_bytes(target_dir)))
            .map_err(|x| self.refused(e, x.to_string()))?;
        let from = self
            .tree
            .dir(&comps, false)
            .map_err(|x| self.refused(e, x.to_string()))?;
        let target_name = OsStr::from_bytes(target_name);
        let make = || {
            nix::unistd::linkat(
                from.as_fd(),
                target_name,
                parent.as_fd(),
                name,
                AtFlags::empty(),
            )
        };
        self.summary.links += 1;
        if fresh && make().is_ok() {
            return Ok(());
        }
        let here = fstatat(parent.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW);
        let there = fstatat(from.as_fd(), target_name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|x| self.io(e, x))?;
        if here.is_ok_and(|h| (h.st_dev, h.st_ino) == (there.st_dev, there.st_ino)) {
            return Ok(());
        }
        if !self.make_room(parent.as_fd(), name, e)? {
            return Ok(());
        }
        match nix::unistd::unlinkat(
            parent.as_fd(),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(x) => return Err(self.io(e, x)),
        }
        make().map_err(|x| self.io(e, x))
    }

    /// Clear the way for a regular file at `name`: refuse a directory,
    /// remove anything else that is not a regular file. `false`: a local
    /// validator signing state is there and is kept as it is.
    fn make_room(
        &mut self,
        parent: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
        e: &Entry,
    ) -> Result<bool, ChunkError> {
        match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if kind(st.st_mode) == SFlag::S_IFDIR => Err(self.refused(
                e,
                "the backup has a file here, but a directory exists; remove it first",
            )),
            Ok(st)
                if kind(st.st_mode) == SFlag::S_IFREG
                    && !self.shared.opts.overwrite_signing_state
                    && self.shared.opts.policy.is_signing_state(&e.path) =>
            {
                // The local file knows what this validator signed; the
                // backup's copy may be older.
                self.summary
                    .signing_state_kept
                    .push(e.display().into_owned());
                Ok(false)
            }
            Ok(st) if kind(st.st_mode) != SFlag::S_IFREG => {
                nix::unistd::unlinkat(parent, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                    .map_err(|x| self.io(e, x))?;
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    /// Open (or create) a file and decide what can be trusted; its chunks
    /// come next.
    fn file(
        &mut self,
        e: Entry,
        size: u64,
        append: &mut Option<AppendCheck>,
    ) -> Result<Option<Current<'a>>, ChunkError> {
        self.summary.files += 1;
        self.summary.bytes_scanned += size;
        self.shared
            .opts
            .progress
            .total
            .fetch_add(size, Ordering::Relaxed);
        let (parent, fresh) = self.parent(&e)?;
        let (_, name) = split_name(&e.path);
        let name = OsStr::from_bytes(name);
        let Some(open) = self.open_files.take(1) else {
            return Err(ChunkError::Aborted);
        };
        if fresh {
            match self.create_file(parent.as_fd(), name, &e) {
                Ok(file) => return self.created(e, size, file, open).map(Some),
                // Someone put it there after all: the careful path.
                Err(nix::errno::Errno::EEXIST) => {}
                Err(x) => return Err(self.open_error(&e, x)),
            }
        }
        if !self.make_room(parent.as_fd(), name, &e)? {
            return Ok(None);
        }
        let file = self.open_file(parent.as_fd(), name, &e)?;
        let st = nix::sys::stat::fstat(&file).map_err(|x| self.io(&e, x))?;
        let (local_size, found) = (st.st_size as u64, Found::of(&st));
        let chunk_size = self.shared.chunk_size;
        let stamp = Stamp::of(&st);
        let journalled = self.prior.trusted(&e.path, &stamp, size);
        if self.prior.complete(&e.path, &stamp, size) {
            // Complete, durable and untouched since an earlier run
            // recorded it, metadata included: not even read.
            self.shared.counters.files_trusted.add(1);
            self.shared
                .opts
                .progress
                .done
                .fetch_add(size, Ordering::Relaxed);
            return Ok(None);
        }
        let mut trusted = if local_size == size { journalled } else { 0 };
        let known = (trusted == 0)
            .then(|| self.prior.known(&e.path, &stamp))
            .flatten();
        if trusted == 0 && known.is_none() && !self.prior.existed && e.append_only {
            trusted = append_trust(&file, local_size, size, chunk_size, append);
        }
        if local_size != size {
            file.set_len(size).map_err(|x| self.io(&e, x))?;
        }
        if known.is_some() {
            self.shared.counters.files_known.add(1);
        }
        let job = self.job(e, size, file, local_size, Origin::Found(found), open);
        Ok(Some(Current {
            job,
            next: 0,
            trusted,
            known,
            chunks: Vec::new(),
            unrecorded: false,
        }))
    }

    /// A file this restore just created, empty: every chunk is fetched
    /// (or left a hole), with nothing to trust or compare. Only a file
    /// large enough for prefix records is sized now, so that a resumed
    /// restore finds it at its size; the others are sized, if their last
    /// bytes are zeros, once complete.
    fn created(
        &mut self,
        e: Entry,
        size: u64,
        file: File,
        open: Permit<'a>,
    ) -> Result<Current<'a>, ChunkError> {
        let big = size.div_ceil(self.shared.chunk_size) >= BIG_FILE_CHUNKS;
        if big {
            file.set_len(size).map_err(|x| self.io(&e, x))?;
        }
        let job = self.job(e, size, file, 0, Origin::Created, open);
        Ok(Current {
            job,
            next: 0,
            trusted: 0,
            known: None,
            chunks: Vec::new(),
            unrecorded: false,
        })
    }

    /// The shared job of a file opened to be restored.
    fn job(
        &self,
        entry: Entry,
        size: u64,
        file: File,
        local_size: u64,
        origin: Origin,
        open: Permit<'a>,
    ) -> Arc<FileJob<'a>> {
        let chunk_size = self.shared.chunk_size;
        let job = Arc::new(FileJob {
            entry,
            file,
            size,
            local_size,
            chunk_size,
            origin,
            remaining: AtomicU64::new(1),
            prefix: Mutex::new(Default::default()),
            chunks: std::sync::OnceLock::new(),
            _open: open,
        });
        if size.div_ceil(chunk_size) >= BIG_FILE_CHUNKS {
            self.shared
                .big
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Arc::downgrade(&job));
        }
        job
    }

    /// Create the file of entry `e`, which must not exist, for writing.
    fn create_file(
        &self,
        parent: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
        e: &Entry,
    ) -> nix::Result<File> {
        let fd = openat(
            parent,
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(e.mode & 0o777),
        )?;
        Ok(File::from(fd))
    }

    fn open_error(&self, e: &Entry, x: nix::errno::Errno) -> ChunkError {
        match x {
            nix::errno::Errno::ELOOP => self.refused(e, "a symlink appeared in its place"),
            x => self.io(e, x),
        }
    }

    /// Open (or create) the file of entry `e`, never through a symlink.
    fn open_file(
        &self,
        parent: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
        e: &Entry,
    ) -> Result<File, ChunkError> {
        let fd = openat(
            parent,
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            // Its final permission bits, less the umask: usually no chmod.
            Mode::from_bits_truncate(e.mode & 0o777),
        )
        .map_err(|x| self.open_error(e, x))?;
        Ok(File::from(fd))
    }

    /// Act on chunk `index` of `job`.
    fn chunk(
        &mut self,
        job: &Arc<FileJob<'a>>,
        index: u64,
        c: ChunkRef,
        trusted: u64,
        append: &mut Option<AppendCheck>,
    ) -> Result<(), ChunkError> {
        if let Some(check) = append.as_mut().filter(|a| a.decided.is_none()) {
            if c.off + c.len <= check.end {
                check
                    .spool
                    .push(&c)
                    .map_err(|x| ChunkError::io(Path::new("(chunk spool)"), x))?;
                if c.off + c.len == check.end {
                    let ok = local_matches(job, &c);
                    check.decided = Some(ok);
                    self.settle_append(job, append)?;
                }
                return Ok(());
            }
        }
        let trusted = match append {
            Some(AppendCheck {
                decided: Some(false),
                ..
            }) => 0,
            _ => trusted,
        };
        let step = restore_step(&c, job.local_size, trusted);
        self.step(job, index, step)
    }

    /// The append-only check is decided: keep or verify the spooled prefix.
    fn settle_append(
        &mut self,
        job: &Arc<FileJob<'a>>,
        append: &mut Option<AppendCheck>,
    ) -> Result<(), ChunkError> {
        let Some(check) = append.as_mut() else {
            return Ok(());
        };
        let ok = check.decided.unwrap_or(false);
        if !ok {
            tracing::warn!(path = %job.entry.display(), "the local append-only file is not a prefix of the backup's; comparing every chunk");
        }
        let spool = std::mem::take(&mut check.spool);
        let mut index = 0u64;
        spool.replay(
            |x| ChunkError::io(Path::new("(chunk spool)"), x),
            |run| {
                for c in run {
                    let step = if ok {
                        RestoreStep::Keep(*c)
                    } else {
                        restore_step(c, job.local_size, 0)
                    };
                    self.step(job, index, step)?;
                    index += 1;
                }
                Ok(())
            },
        )
    }

    fn step(
        &mut self,
        job: &Arc<FileJob<'a>>,
        index: u64,
        step: RestoreStep,
    ) -> Result<(), ChunkError> {
        let shared = self.shared;
        match step {
            RestoreStep::Keep(c) => {
                shared.counters.chunks_reused.add(1);
                job.remaining.fetch_add(1, Ordering::Relaxed);
                shared.chunk_done(job, index, c.len);
            }
            RestoreStep::Empty(c) => {
                shared.counters.holes.add(1);
                if c.off < job.local_size {
                    make_hole(job, &c).map_err(|x| self.io(&job.entry, x))?;
                }
                job.remaining.fetch_add(1, Ordering::Relaxed);
                shared.chunk_done(job, index, c.len);
            }
            RestoreStep::Verify(chunk) => {
                job.remaining.fetch_add(1, Ordering::Relaxed);
                let want = Want {
                    job: Arc::clone(job),
                    index,
                    chunk,
                };
                self.verify.send(want).map_err(|_| ChunkError::Aborted)?;
            }
            RestoreStep::Fetch(chunk) => {
                job.remaining.fetch_add(1, Ordering::Relaxed);
                let want = Want {
                    job: Arc::clone(job),
                    index,
                    chunk,
                };
                self.batch
                    .send(BatchMsg::Want(want))
                    .map_err(|_| ChunkError::Aborted)?;
            }
        }
        Ok(())
    }

    /// All of a file's chunks are planned: drop the planner's hold.
    fn finish_file(
        &mut self,
        current: Option<Current<'a>>,
        append: &mut Option<AppendCheck>,
    ) -> Result<(), ChunkError> {
        if let Some(Current {
            job,
            chunks,
            unrecorded,
            ..
        }) = current
        {
            // Set before the planner's hold is released: whoever completes
            // the file journals them.
            if !unrecorded {
                let _ = job.chunks.set(chunks.into());
            }
            if append.as_ref().is_some_and(|a| a.decided.is_none()) {
                // The stream ended before the trusted end (cannot happen
                // with a valid stream): verify what was spooled.
                if let Some(a) = append.as_mut() {
                    a.decided = Some(false);
                }
                self.settle_append(&job, append)?;
            }
            self.shared.release(&job);
        }
        *append = None;
        Ok(())
    }
}

/// An append-only file's candidate trusted prefix, waiting for its last
/// chunk to be checked; the prefix's chunks wait in the spool meanwhile.
struct AppendCheck {
    end: u64,
    spool: Spool,
    decided: Option<bool>,
}

fn kind(mode: u32) -> SFlag {
    SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits())
}

/// Where the first hole of `file` starts (its size if none).
fn first_hole(file: &File, size: u64) -> u64 {
    match nix::unistd::lseek(file.as_fd(), 0, nix::unistd::Whence::SeekHole) {
        Ok(h) if h >= 0 => (h as u64).min(size),
        _ => 0,
    }
}

/// Whether the local bytes of chunk `c` of `job` are the backup's.
fn local_matches(job: &FileJob<'_>, c: &ChunkRef) -> bool {
    let mut buf = vec![0u8; c.len as usize];
    if job.file.read_exact_at(&mut buf, c.off).is_err() {
        return false;
    }
    match c.hash {
        Some(h) => Id::of(&buf) == h,
        None => buf.iter().all(|&b| b == 0),
    }
}

/// Make chunk `c` of `job` a hole (or zeros where holes are unsupported).
fn make_hole(job: &FileJob<'_>, c: &ChunkRef) -> std::io::Result<()> {
    let len = c.len.min(job.local_size - c.off);
    if crate::sparse::punch_hole(&job.file, c.off, len) {
        return Ok(());
    }
    let mut buf = vec![0u8; len as usize];
    job.file.read_exact_at(&mut buf, c.off)?;
    if buf.iter().any(|&b| b != 0) {
        buf.fill(0);
        job.file.write_all_at(&buf, c.off)?;
    }
    Ok(())
}

/// The node's own block log: trusted to its first hole, once the last
/// trusted chunk checks out (see `AppendCheck`). The bytes trusted, `0`
/// for none.
fn append_trust(
    file: &File,
    local_size: u64,
    size: u64,
    chunk_size: u64,
    append: &mut Option<AppendCheck>,
) -> u64 {
    let hole = first_hole(file, local_size);
    let end = append_trusted_end(local_size, hole, size, chunk_size);
    if end > 0 {
        *append = Some(AppendCheck {
            end,
            spool: Spool::new(),
            decided: None,
        });
    }
    end
}
