//! `btm key generate FILE`: the ed25519 key a publisher signs its
//! snapshots with (docs/publishing.md).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use btm_chunk::public::SigningKey;

/// Arguments of `btm key`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Make a signing key (mode 0600; never overwrites) and print its
    /// public key, alone on the last line, in the form --trust takes
    Generate {
        /// Where to write the secret key
        file: PathBuf,
    },
    /// Print the public key of a signing key
    Public {
        /// The secret key file
        file: PathBuf,
    },
}

pub fn run(args: KeyArgs, out: &mut dyn Write) -> Result<()> {
    match args.command {
        KeyCommand::Generate { file } => {
            let key = SigningKey::generate()?;
            key.save(&file)?;
            writeln!(
                out,
                "wrote the signing key {} (keep it secret; whoever has it can publish in your name)",
                file.display()
            )?;
            writeln!(out, "readers trust it with --trust (or trust = [...]):")?;
            writeln!(out, "{}", key.public())?;
        }
        KeyCommand::Public { file } => writeln!(out, "{}", SigningKey::load(&file)?.public())?,
    }
    Ok(())
}
