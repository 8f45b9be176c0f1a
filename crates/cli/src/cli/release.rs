//! `btm release LABEL`: return the snapshots protected with LABEL to
//! normal retention (the next prune may destroy them).

use std::io::Write;

use anyhow::Result;
use clap::Args;

use btm::volume::Label;

use super::VolumeArgs;

/// Arguments of `btm release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    volume: VolumeArgs,
    /// The protection label given to `btm snapshot --protect`
    label: Label,
}

pub fn run(args: ReleaseArgs, out: &mut dyn Write) -> Result<()> {
    let released = args.volume.plain_cfg()?.ops()?.release(&args.label)?;
    let list: Vec<String> = released
        .iter()
        .map(|(branch, h)| match branch {
            None => h.to_string(),
            Some(b) => format!("{h} in branch {b}"),
        })
        .collect();
    writeln!(
        out,
        "released {} ({}); retention (or a branch's expiry) applies to it again",
        list.join(", "),
        args.label
    )?;
    Ok(())
}
