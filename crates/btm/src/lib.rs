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
//! This crate is the bottom layer of the workspace and what a node embeds:
//! it has no async runtime and no cloud SDK. Inside it, each module depends
//! only on those listed after it: [`config`] (the [`BtmCfg`] façade) →
//! [`ops`] (the operations handle, with its volume and directories passed
//! in) and [`rollback`] (switches between lines, their journal) →
//! [`pruner`], [`retention`] (pure) → [`volume`] (drivers, one command
//! wrapper) → [`pin`], [`lock`], [`preserve`], [`validator`], [`window`],
//! [`exec`] → [`family`], [`confined`], [`dirs`], [`sys`] (the only `unsafe`).
//! [`client`] and [`protocol`] let a node talk to a running daemon.
//!
//! Above it: `btm-chunk` (the sparse chunk engine and its stores), then
//! `btm-live` (live restore's FUSE server), then `btm-daemon` (height
//! sources, scheduler, exports, settings; it reads live restores' figures
//! for its metrics), then `btm-cli`, the only crate that builds the `btm`
//! binary.

pub mod client;
pub mod config;
pub mod confined;
pub mod dirs;
pub mod error;
pub mod exec;
pub mod family;
pub mod host;
pub mod lock;
pub mod ops;
pub mod pathrule;
pub mod pin;
pub mod preserve;
pub mod protocol;
pub mod pruner;
pub mod retention;
pub mod rollback;
pub mod sys;
pub mod validator;
pub mod volume;
pub mod window;

/// The README's examples, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// The library guide's examples (the seed's snippet among them), compiled
/// by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/library.md")]
pub struct LibraryDoctests;

pub use config::BtmCfg;
pub use dirs::Dirs;
pub use error::Error;
pub use ops::{Ops, SnapshotOptions, SnapshotReport};
pub use retention::{Algo as SnapAlgo, Plan, Policy};
pub use rollback::{Ask, ExpiryReport, PreparedSwitch};
pub use volume::{SnapMode, Snapshot, SnapshotOutcome};
