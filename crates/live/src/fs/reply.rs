//! One way to answer the kernel: an operation's result, whatever the kind
//! of reply it goes into.

use std::time::Duration;

use fuser::{
    Errno, FileAttr, Generation, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyWrite,
};

/// How long the kernel may trust names and attributes.
pub(super) const TTL: Duration = Duration::from_secs(1);

/// A reply that takes a `Result<T, Errno>`.
pub(super) trait Answer<T> {
    /// Send `r`: the value, or the error.
    fn answer(self, r: Result<T, Errno>);
}

impl Answer<FileAttr> for ReplyEntry {
    fn answer(self, r: Result<FileAttr, Errno>) {
        match r {
            Ok(a) => self.entry(&TTL, &a, Generation(0)),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<FileAttr> for ReplyAttr {
    fn answer(self, r: Result<FileAttr, Errno>) {
        match r {
            Ok(a) => self.attr(&TTL, &a),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<()> for ReplyEmpty {
    fn answer(self, r: Result<(), Errno>) {
        match r {
            Ok(()) => self.ok(),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<Vec<u8>> for ReplyData {
    fn answer(self, r: Result<Vec<u8>, Errno>) {
        match r {
            Ok(d) => self.data(&d),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<u32> for ReplyWrite {
    fn answer(self, r: Result<u32, Errno>) {
        match r {
            Ok(n) => self.written(n),
            Err(e) => self.error(e),
        }
    }
}
