//! `restore --delete`: removing local entries the backup does not have,
//! once everything else is restored.
//!
//! Two rules make it safe on a validator:
//!
//! - **Only what the backup covers.** A backup leaves some things out on
//!   purpose: key material by default, and every `--exclude` pattern its
//!   head records. Those are outside its scope, not strays, so they are
//!   kept ([`Exclusions::outside_backup`]), and the summary says so. So is
//!   local validator signing state, unless asked otherwise.
//! - **Nothing by path.** The destination is walked with descriptors,
//!   never following a symlink, and every removal is relative to its
//!   parent's descriptor: a directory replaced by a symlink while the walk
//!   is in it cannot redirect a removal outside the destination. A
//!   directory the backup lacks is emptied entry by entry, keeping what
//!   the rules keep, and removed only if that leaves it empty.

use crate::Policy;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use nix::sys::stat::SFlag;
use nix::unistd::UnlinkatFlags;
use serde::Serialize;

use super::super::backup::walk::Walker;
use super::super::exclude::Exclusions;
use super::super::format::head::Decoded;
use super::super::format::tree::{walk_order, Item};
use super::super::inventory::Entries;
use super::super::ChunkError;
use super::journal;

/// How many kept entries a summary names; the rest are counted.
const KEPT_NAMED: usize = 100;

/// A local entry `--delete` left alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Kept {
    /// Relative to the destination.
    pub path: String,
    /// Why: the backup's exclusion that covers it, or "validator signing
    /// state".
    pub why: String,
}

/// What `--delete` did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Deleted {
    /// Entries removed.
    pub removed: u64,
    /// Entries kept because the backup left them out on purpose, or they
    /// are validator signing state: how many in all.
    pub kept: u64,
    /// The first hundred of them.
    pub kept_named: Vec<Kept>,
}

impl Deleted {
    fn keep(&mut self, rel: &[u8], why: &str) {
        self.kept += 1;
        if self.kept_named.len() < KEPT_NAMED {
            self.kept_named.push(Kept {
                path: String::from_utf8_lossy(rel).into_owned(),
                why: why.to_owned(),
            });
        }
    }
}

/// What a restore wants of the pass.
pub struct Scope<'a> {
    /// Only paths this selects are restored, so only these may go.
    pub filter: Option<&'a regex::bytes::Regex>,
    /// Keep local signing state.
    pub keep_signing_state: bool,
    /// What is key material and signing state.
    pub policy: Policy,
}

/// The backup's paths, in walk order, whatever its format's order.
enum Wanted<'a> {
    Stream(Entries<'a>),
    Sorted(std::vec::IntoIter<Vec<u8>>),
}

impl Wanted<'_> {
    fn next(&mut self) -> Result<Option<Vec<u8>>, ChunkError> {
        match self {
            Wanted::Sorted(paths) => Ok(paths.next()),
            Wanted::Stream(entries) => loop {
                match entries.next_item()? {
                    Some(Item::Entry(e)) => return Ok(Some(e.path)),
                    Some(Item::Chunks(_)) => {}
                    None => return Ok(None),
                }
            },
        }
    }
}

/// A directory the backup lacks, being emptied: removed when the walk
/// leaves it, if it is empty then.
struct Emptying {
    rel: Vec<u8>,
    name: Vec<u8>,
    parent: Arc<OwnedFd>,
}

/// Remove what under `dest` the backup (`index`, streamed by `entries`)
/// does not have, within `scope`. A walk of `dest` beside the backup's
/// entries, both in walk order.
pub fn delete_extra(
    dest: &Path,
    index: &Decoded,
    entries: Entries<'_>,
    scope: &Scope<'_>,
) -> Result<Deleted, ChunkError> {
    let mut outside = Exclusions::outside_backup(scope.policy.secrets, index.excluded())?;
    let mut wanted = match index {
        // Format 1 is not in walk order: its paths are read once, sorted.
        Decoded::V1(_) => {
            let mut stream = Wanted::Stream(entries);
            let mut all = Vec::new();
            while let Some(p) = stream.next()? {
                all.push(p);
            }
            all.sort_by(|a, b| walk_order(a, b));
            Wanted::Sorted(all.into_iter())
        }
        Decoded::V2(_) => Wanted::Stream(entries),
    };
    let mut head = wanted.next()?;
    let mut walker = Walker::new(dest)?;
    let mut emptying: Vec<Emptying> = Vec::new();
    let mut done = Deleted::default();
    while let Some(w) = walker.next() {
        let w = w?;
        while emptying.last().is_some_and(|d| !is_below(&w.rel, &d.rel)) {
            leave(dest, emptying.pop(), &mut done)?;
        }
        if w.depth == 0 && w.name == journal::NAME.as_bytes() {
            continue;
        }
        while head
            .as_ref()
            .is_some_and(|h| walk_order(h, &w.rel) == std::cmp::Ordering::Less)
        {
            head = wanted.next()?;
        }
        let in_backup = head.as_ref().is_some_and(|h| h == &w.rel);
        let selected = scope.filter.is_none_or(|re| re.is_match(&w.rel));
        if in_backup || !selected {
            continue;
        }
        let is_dir = w.kind() == SFlag::S_IFDIR;
        if let Some(why) = outside.reason(&w.rel) {
            done.keep(&w.rel, why);
            if is_dir {
                walker.skip_children(&w.rel);
            }
            continue;
        }
        if is_dir {
            emptying.push(Emptying {
                rel: w.rel.clone(),
                name: w.name.clone(),
                parent: Arc::clone(&w.dir),
            });
            continue;
        }
        if scope.keep_signing_state && scope.policy.is_signing_state(&w.rel) {
            done.keep(&w.rel, "validator signing state");
            continue;
        }
        nix::unistd::unlinkat(
            w.dir.as_fd(),
            OsStr::from_bytes(&w.name),
            UnlinkatFlags::NoRemoveDir,
        )
        .map_err(|e| ChunkError::io(&dest.join(OsStr::from_bytes(&w.rel)), e.into()))?;
        done.removed += 1;
    }
    while let Some(d) = emptying.pop() {
        leave(dest, Some(d), &mut done)?;
    }
    Ok(done)
}

/// Whether `rel` lies below directory `dir`.
fn is_below(rel: &[u8], dir: &[u8]) -> bool {
    rel.len() > dir.len() && rel.starts_with(dir) && rel[dir.len()] == b'/'
}

/// The walk left directory `d`: remove it if nothing in it was kept.
fn leave(dest: &Path, d: Option<Emptying>, done: &mut Deleted) -> Result<(), ChunkError> {
    let Some(d) = d else { return Ok(()) };
    match nix::unistd::unlinkat(
        d.parent.as_fd(),
        OsStr::from_bytes(&d.name),
        UnlinkatFlags::RemoveDir,
    ) {
        Ok(()) => {
            done.removed += 1;
            Ok(())
        }
        // It holds what was kept (said already), or something appeared.
        Err(nix::errno::Errno::ENOTEMPTY | nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(ChunkError::io(
            &dest.join(OsStr::from_bytes(&d.rel)),
            e.into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_means_inside_not_beside() {
        assert!(is_below(b"a/b", b"a"));
        assert!(is_below(b"a/b/c", b"a"));
        assert!(!is_below(b"a", b"a"));
        assert!(!is_below(b"ab", b"a"));
        assert!(!is_below(b"a-b/c", b"a"));
    }
}
