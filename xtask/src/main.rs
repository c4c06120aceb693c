//! `cargo xtask <task>`: project tasks, run from the workspace root.
//!
//! - `sort-demo [ARGS]`: the minGPT LoRA exercise in release mode (`lora-train sort-demo ARGS`).
//! - `bench <suite> [ARGS]`: benchmarks (`lora-train bench SUITE ARGS`): `sort`, `lora-layer`, `infer`,
//!   `finetune`, `data`, `matmul` (a probe of GPT-2's linear and attention products); e.g.
//!   `bench infer --backend wgpu`. Each writes `target/bench/<suite>.json`.

use std::process::{Command, ExitCode};

fn cargo_run(bin_args: &[&str], extra: &[String]) -> ExitCode {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--release", "--quiet", "-p", "lora-train", "--"])
        .args(bin_args)
        .args(extra)
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => ExitCode::from(s.code().unwrap_or(1).clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("xtask: cannot run cargo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("sort-demo") => cargo_run(&["sort-demo"], &args[1..]),
        Some("bench") => cargo_run(&["bench"], &args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask sort-demo [--backend flex|ndarray|wgpu] [--seed 0,1,2] [--pretrain-iters N] [--finetune-iters N] [--eval-samples N] [--lora-targets attn,wpe] [--report PATH]\n       cargo xtask bench sort|lora-layer|infer|finetune|data|matmul [--backend flex|wgpu] [SUITE FLAGS]"
            );
            ExitCode::from(2)
        }
    }
}
