//! `btm simulate`: replay a policy over heights `itv, 2·itv, … ≤ blocks`
//! exactly as the daemon applies it, and show what survives and why.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use btm::retention::{Decision, Policy};

use super::{print_json, PolicyArgs};

/// Arguments of `btm simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    policy: PolicyArgs,
    /// Replay up to this block height
    #[arg(short = 'b', long)]
    blocks: u64,
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
}

pub fn run(args: SimulateArgs, out: &mut dyn Write) -> Result<()> {
    let policy = Policy::new(args.policy.algo, args.policy.itv, args.policy.cap)?;
    let plan = policy.simulate(args.blocks)?;
    if args.json {
        let reasons = plan
            .verdicts
            .iter()
            .map(|v| Reason {
                height: v.height,
                decision: &v.decision,
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
        writeln!(out, "{:>12}  {}", v.height, v.decision)?;
    }
    writeln!(
        out,
        "{} snapshot(s) kept after replaying {} heights",
        plan.verdicts.len(),
        args.blocks / args.policy.itv
    )?;
    Ok(())
}
