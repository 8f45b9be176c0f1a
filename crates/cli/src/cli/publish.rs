//! `btm publish`: write a store's signed catalog, so that anyone can read
//! it from a static web server, a CDN or a public bucket
//! (docs/publishing.md).

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;

use super::print_json;
use super::store::StoreArgs;

/// Arguments of `btm publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: PublishArgs, out: &mut dyn Write) -> Result<()> {
    let key = args.store.signing_key()?;
    let store = args.store.open_own()?;
    let now = chrono::Utc::now();
    let report = btm_chunk::public::publish(store.as_ref(), &key, now, args.store.expires)
        .with_context(|| format!("publishing {} failed", store.describe()))?;
    if args.json {
        return print_json(out, &report);
    }
    writeln!(
        out,
        "published {}: {} backup(s) and {} pack index(es), signed by {}",
        store.describe(),
        report.heads,
        report.pack_indexes,
        report.key
    )?;
    if !report.skipped_v1.is_empty() {
        writeln!(
            out,
            "not published: {} version 1 backup(s) (made by an older btm): {}",
            report.skipped_v1.len(),
            report.skipped_v1.join(", ")
        )?;
    }
    Ok(())
}
