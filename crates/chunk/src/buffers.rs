//! A small pool of byte buffers, so that a pipeline that moves megabytes
//! through short-lived buffers reuses them instead of allocating each one
//! afresh. The binary's allocator returns freed pages to the system at once
//! (to keep peak memory honest), so every fresh buffer costs a page fault
//! per 4 KiB touched: on a restore or backup of hundreds of megabytes that
//! was a third of the system time.

use std::sync::Mutex;

/// Buffers kept for reuse: at most `keep`, each at most `max_capacity`.
pub struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
    fresh_capacity: usize,
    max_capacity: usize,
}

impl Buffers {
    /// A pool keeping at most `keep` buffers of at most `max_capacity`
    /// bytes; a new buffer is made with `fresh_capacity`. Callers size
    /// `keep` so that the pool holds no more than their pipeline already
    /// has in flight at its peak.
    pub fn new(keep: usize, fresh_capacity: usize, max_capacity: usize) -> Self {
        Buffers {
            free: Mutex::new(Vec::new()),
            keep,
            fresh_capacity,
            max_capacity,
        }
    }

    /// An empty buffer, reused if one is free.
    pub fn take(&self) -> Vec<u8> {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(mut b) => {
                b.clear();
                b
            }
            None => Vec::with_capacity(self.fresh_capacity),
        }
    }

    /// Return a buffer; dropped if the pool is full or the buffer grew past
    /// the pool's limit.
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() > self.max_capacity {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_up_to_its_limits() {
        let pool = Buffers::new(2, 16, 64);
        let mut a = pool.take();
        assert!(a.is_empty() && a.capacity() >= 16);
        a.extend_from_slice(b"data");
        let at = a.as_ptr();
        pool.give(a);
        let b = pool.take();
        assert!(b.is_empty(), "a reused buffer comes back empty");
        assert_eq!(b.as_ptr(), at, "the same allocation");
        pool.give(b);
        pool.give(Vec::with_capacity(16));
        pool.give(Vec::with_capacity(16));
        assert_eq!(pool.free.lock().expect("lock").len(), 2, "keeps at most 2");
        let big = pool.take();
        drop(big);
        let pool = Buffers::new(4, 0, 64);
        pool.give(Vec::with_capacity(1000));
        assert!(
            pool.free.lock().expect("lock").is_empty(),
            "too large to keep"
        );
    }
}
