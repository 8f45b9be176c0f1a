//! One bit per live file, shared between threads: which files are done,
//! which may still carry their mark.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per live file.
#[derive(Debug)]
pub(super) struct Bits(Box<[AtomicU64]>);

impl Bits {
    pub(super) fn new(n: u32, set: bool) -> Bits {
        let fill = if set { u64::MAX } else { 0 };
        Bits(
            (0..u64::from(n).div_ceil(64))
                .map(|_| AtomicU64::new(fill))
                .collect(),
        )
    }

    pub(super) fn get(&self, i: u32) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// Set bit `i`; whether it was clear.
    pub(super) fn set(&self, i: u32) -> bool {
        self.0.get((i / 64) as usize).is_some_and(|w| {
            let bit = 1 << (i % 64);
            w.fetch_or(bit, Ordering::AcqRel) & bit == 0
        })
    }

    pub(super) fn clear(&self, i: u32) {
        if let Some(w) = self.0.get((i / 64) as usize) {
            w.fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        }
    }

    /// The bits set in both `self` and `other`, below `n`.
    pub(super) fn both(&self, other: &Bits, n: u32) -> Vec<u32> {
        let mut out = Vec::new();
        for (w, (a, b)) in self.0.iter().zip(other.0.iter()).enumerate() {
            let mut word = a.load(Ordering::Acquire) & b.load(Ordering::Acquire);
            while word != 0 {
                let bit = word.trailing_zeros();
                let i = w as u32 * 64 + bit;
                if i < n {
                    out.push(i);
                }
                word &= word - 1;
            }
        }
        out
    }
}
