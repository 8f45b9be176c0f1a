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
    /// Sign this list of mirrors (other URLs serving copies of the store)
    /// into the catalog, comma-separated; restores draw on them too. An
    /// empty value clears it [default: the list the catalog has]
    // The brackets are clap's help text, not a rustdoc link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "URL,...", value_parser = parse_mirror_list)]
    mirror_list: Option<MirrorList>,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

/// Mirror URLs, each a store location.
#[derive(Debug, Clone)]
struct MirrorList(Vec<String>);

fn parse_mirror_list(s: &str) -> Result<MirrorList, String> {
    let urls: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    for u in &urls {
        match u.parse::<btm_chunk::store::Location>() {
            Ok(btm_chunk::store::Location::Local(_)) => {
                return Err(format!("mirror {u}: a local path means nothing to a reader elsewhere; give a URL (https://, s3://, gs://, az://)"))
            }
            Ok(_) => {}
            Err(e) => return Err(format!("mirror {u}: {e}")),
        }
    }
    Ok(MirrorList(urls))
}

pub fn run(args: PublishArgs, out: &mut dyn Write) -> Result<()> {
    let key = args.store.signing_key()?;
    let store = args.store.open_own()?;
    let now = chrono::Utc::now();
    let mirrors = args.mirror_list.as_ref().map(|m| m.0.as_slice());
    let report = btm_chunk::public::publish(store.as_ref(), &key, now, args.store.expires, mirrors)
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
