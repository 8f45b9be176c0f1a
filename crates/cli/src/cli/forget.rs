//! `btm forget`: delete a backup's index; its data goes at the next gc.

use std::io::Write;

use anyhow::Result;
use clap::Args;

use super::store::StoreArgs;

/// Arguments of `btm forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The backup to forget (its index is deleted; its data goes at the
    /// next `btm gc`)
    name: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Say what would be deleted; delete nothing
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: ForgetArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open_writable()?;
    store.with(|s| Ok(args.store.repo(&s).forget(&args.name, args.dry_run)?))?;
    if args.dry_run {
        writeln!(out, "would forget {}", args.name)?;
    } else {
        writeln!(out, "forgot {}; `btm gc` frees its data", args.name)?;
    }
    Ok(())
}
