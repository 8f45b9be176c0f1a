//! Hard links: which paths of a backup are other names of a file it
//! already holds (`docs/format.md`, "Tree segments", kind 4).
//!
//! The first path of an inode that the walk backs up is the file; each
//! later path of the same device and inode is a link to it. Only files
//! with more than one name are remembered, and each is forgotten once all
//! its names were seen, as tar does, so a tree without hard links costs
//! nothing and one full of them costs a path per inode still expecting
//! names.

use std::collections::HashMap;

use nix::sys::stat::FileStat;

/// The inodes with names still to come.
#[derive(Default)]
pub(super) struct Links {
    /// By device and inode: the path backed up as the file, and how many
    /// of its other names are still to come.
    first: HashMap<(u64, u64), (Vec<u8>, u64)>,
}

/// What a file the walk found is, for the backup.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Name {
    /// Its only name: a plain file.
    Only,
    /// The first name of a file with others: the file, flagged as linked.
    First,
    /// Another name of the file backed up at this path.
    LinkTo(Vec<u8>),
}

impl Links {
    /// What `rel`, a regular file with `st`, is.
    pub(super) fn see(&mut self, rel: &[u8], st: &FileStat) -> Name {
        if st.st_nlink <= 1 {
            return Name::Only;
        }
        let key = (st.st_dev, st.st_ino);
        match self.first.get_mut(&key) {
            Some((target, left)) => {
                let target = target.clone();
                *left = left.saturating_sub(1);
                if *left == 0 {
                    self.first.remove(&key);
                }
                Name::LinkTo(target)
            }
            None => {
                self.first.insert(key, (rel.to_vec(), st.st_nlink - 1));
                Name::First
            }
        }
    }

    /// `rel`, seen as [`Name::First`], is not backed up after all (it went
    /// away): a later name of its inode becomes the file.
    pub(super) fn gone(&mut self, rel: &[u8], st: &FileStat) {
        let key = (st.st_dev, st.st_ino);
        if self.first.get(&key).is_some_and(|(p, _)| p == rel) {
            self.first.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat with these fields (the rest from `/`'s).
    fn stat(dev: u64, ino: u64, nlink: u64) -> FileStat {
        let mut st = nix::sys::stat::stat("/").expect("stat /");
        st.st_dev = dev;
        st.st_ino = ino;
        st.st_nlink = nlink;
        st
    }

    #[test]
    fn later_names_link_to_the_first_and_are_forgotten_when_all_are_seen() {
        let mut l = Links::default();
        assert_eq!(l.see(b"a", &stat(1, 5, 1)), Name::Only);
        assert_eq!(l.see(b"ck/1.sst", &stat(1, 9, 3)), Name::First);
        // Same inode number on another device: another file.
        assert_eq!(l.see(b"other", &stat(2, 9, 2)), Name::First);
        assert_eq!(
            l.see(b"db/1.sst", &stat(1, 9, 3)),
            Name::LinkTo(b"ck/1.sst".to_vec())
        );
        assert_eq!(
            l.see(b"db2/1.sst", &stat(1, 9, 3)),
            Name::LinkTo(b"ck/1.sst".to_vec())
        );
        assert!(!l.first.contains_key(&(1, 9)), "all names seen");
        // A first name that went away: the next name is the file.
        l.gone(b"other", &stat(2, 9, 2));
        assert_eq!(l.see(b"z", &stat(2, 9, 2)), Name::First);
    }
}
