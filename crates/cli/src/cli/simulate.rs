//! `btm simulate`: replay a policy over heights `itv, 2·itv, … ≤ blocks`
//! exactly as the daemon applies it, and show what survives and why.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use btm::retention::{Decision, Policy};
use btm::volume::Label;

use super::{print_json, PolicyArgs};

/// Arguments of `btm simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    policy: PolicyArgs,
    /// Replay up to this block height
    #[arg(short = 'b', long)]
    blocks: u64,
    /// Protect the snapshot at height H with LABEL as it is taken
    /// (repeatable), as `btm snapshot --protect` does
    #[arg(long, value_name = "H=LABEL", value_parser = parse_protected)]
    protect: Vec<(u64, Label)>,
    /// Print {"kept":[…]} (newest first) with the reasons
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Output<'a> {
    kept: Vec<u64>,
    reasons: Vec<Reason<'a>>,
}

#[derive(Serialize)]
struct Reason<'a> {
    height: u64,
    #[serde(flatten)]
    decision: &'a Decision,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<&'a str>,
}

fn parse_protected(s: &str) -> Result<(u64, Label), String> {
    let (h, l) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not H=LABEL"))?;
    let h = h
        .parse()
        .map_err(|_| format!("'{h}' in '{s}' is not a block height"))?;
    Ok((h, l.parse()?))
}

pub fn run(args: SimulateArgs, out: &mut dyn Write) -> Result<()> {
    let policy = Policy::new(args.policy.algo, args.policy.itv, args.policy.cap)?;
    let protected = args
        .protect
        .iter()
        .map(|(h, l)| (*h, l.to_string()))
        .collect();
    let plan = policy.simulate_protected(args.blocks, &protected)?;
    if args.json {
        let reasons = plan
            .verdicts
            .iter()
            .map(|v| Reason {
                height: v.height,
                decision: &v.decision,
                label: plan.protected.get(&v.height).map(String::as_str),
            })
            .collect();
        return print_json(
            out,
            &Output {
                kept: plan.kept(),
                reasons,
            },
        );
    }
    for v in &plan.verdicts {
        writeln!(out, "{:>12}  {}", v.height, plan.describe(v))?;
    }
    writeln!(
        out,
        "{} snapshot(s) kept after replaying {} heights",
        plan.verdicts.len(),
        args.blocks / args.policy.itv
    )?;
    Ok(())
}
