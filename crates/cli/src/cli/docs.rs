//! `btm completions SHELL` and `btm manpages DIR`: shell completions and
//! man pages generated from the clap definitions themselves, so they can
//! never disagree with the flags. The package build runs both (scripts/
//! pack.sh, packaging/build-deb.sh); `install.sh` and the `.deb` install
//! them.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;

/// Arguments of `btm completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell
    shell: Shell,
}

/// Arguments of `btm manpages`.
#[derive(Debug, Args)]
pub struct ManpagesArgs {
    /// Directory to write btm.1 and one btm-VERB.1 per subcommand into
    /// (created if missing)
    dir: PathBuf,
}

pub fn completions(args: CompletionsArgs, out: &mut dyn Write) -> Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "btm", out);
    Ok(())
}

pub fn manpages(args: ManpagesArgs, out: &mut dyn Write) -> Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut pages = vec![("btm".to_owned(), cmd.clone())];
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("btm-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let path = args.dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut buf)
            .with_context(|| format!("cannot render {name}.1"))?;
        std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(out, "{}", path.display())?;
    }
    Ok(())
}
