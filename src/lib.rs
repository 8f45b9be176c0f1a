//! btm, the Blockchain Time Machine: block-height snapshots of a node's
//! data volume (ZFS dataset or btrfs subvolume), pruned by the fair and fade
//! retention policies, with rollback that can keep a validator's signing
//! state.
//!
//! The library is usable without the CLI:
//!
//! ```no_run
//! use btm::{BtmCfg, SnapAlgo, SnapMode};
//!
//! let cfg = BtmCfg {
//!     itv: 10,
//!     cap: 100,
//!     mode: SnapMode::Zfs,
//!     algo: SnapAlgo::Fade,
//!     volume: "zroot/data".to_owned(),
//! };
//! cfg.snapshot(10)?; // snapshot at height 10, then prune
//! for s in cfg.list_snapshots()? {
//!     println!("{} {:?}", s.height, s.created);
//! }
//! cfg.rollback(Some(10), true)?;
//! # Ok::<(), btm::Error>(())
//! ```
//!
//! Layers, each depending only on those below it: [`daemon`] →
//! [`config`] (the [`BtmCfg`] façade, the daemon's settings), [`height`]
//! (polled sources) → [`pruner`], [`retention`] (pure), [`volume`] (drivers,
//! one command wrapper) → [`lock`], [`preserve`], [`window`], [`exec`],
//! [`dirs`]. [`client`] and [`protocol`] let a node talk to the daemon.

pub mod chunk;
pub mod client;
pub mod config;
pub mod confined;
pub mod daemon;
pub mod dirs;
pub mod error;
pub mod exec;
pub mod export;
pub mod height;
pub mod lock;
pub mod pin;
pub mod preserve;
pub mod protocol;
pub mod pruner;
pub mod retention;
pub mod store;
pub mod sys;
pub mod validator;
pub mod volume;
pub mod window;

/// The README's examples, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The library guide's examples (the seed's snippet among them), compiled
/// by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../docs/library.md")]
pub struct LibraryDoctests;

pub use config::{BtmCfg, PreparedRollback, SnapshotReport};
pub use error::Error;
pub use retention::{Algo as SnapAlgo, Plan, Policy};
pub use volume::{SnapMode, Snapshot, SnapshotOutcome};
