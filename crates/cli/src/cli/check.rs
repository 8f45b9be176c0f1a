//! `btm check`: verify a store (indexes parse, every chunk exists, or
//! with `--read-data` re-hashes).

use std::io::Write;

use anyhow::{bail, Result};
use clap::Args;

use super::print_json;
use super::store::StoreArgs;

/// Arguments of `btm check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Also read every pack, and decompress and re-hash every chunk
    #[arg(long)]
    read_data: bool,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: CheckArgs, out: &mut dyn Write) -> Result<()> {
    let store = args.store.open_reader()?;
    let report = args.store.repo(&store).check(args.read_data)?;
    if args.json {
        print_json(out, &report)?;
    } else {
        for p in &report.problems {
            writeln!(out, "problem: {p}")?;
        }
        writeln!(
            out,
            "{} indexes, {} chunks referenced in {} packs{}; {} problems",
            report.indexes,
            report.chunks,
            report.packs,
            if args.read_data {
                format!(", {} verified", report.chunks_verified)
            } else {
                String::new()
            },
            report.problems.len()
        )?;
    }
    if !report.problems.is_empty() {
        bail!(
            "check found {} problem(s) in {}",
            report.problems.len(),
            store.describe()
        );
    }
    Ok(())
}
