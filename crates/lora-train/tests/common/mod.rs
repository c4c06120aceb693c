//! Helpers shared by the CLI tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh folder with a model folder holding the GPT-2 tokenizer.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../lora-data/tests/fixtures/gpt2-tokenizer.json"),
        dir.join("model/tokenizer.json"),
    )
    .unwrap();
    dir
}

/// Run the binary; (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    run_in(Path::new("."), args)
}

/// Run the binary in `dir`; (exit code, stdout, stderr).
pub fn run_in<S: AsRef<std::ffi::OsStr>>(dir: &Path, args: &[S]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lora-train"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A tiny LoRA run (gpt-nano shapes, GPT-2 tokenizer, 40 steps of 2 × 16 tokens).
pub fn tiny_run(d: &Path, out: &str) -> Vec<String> {
    tiny_text(d);
    tiny_args(d, out)
}

/// `d/t.txt`, the text `tiny_run` trains on.
pub fn tiny_text(d: &Path) {
    let text = d.join("t.txt");
    if !text.exists() {
        let line =
            "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.\n";
        std::fs::write(&text, line.repeat(12)).unwrap();
    }
}

/// `tiny_run`'s arguments, paths under `d`.
pub fn tiny_args(d: &Path, out: &str) -> Vec<String> {
    let text = d.join("t.txt");
    let tok = d.join("model/tokenizer.json");
    let mut args: Vec<String> = [
        "finetune",
        "--model-type",
        "gpt-nano",
        "--dataset",
        "text",
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--max-iters",
        "40",
        "--warmup",
        "5",
        "--lr",
        "1e-2",
        "--log-every",
        "5",
        "--eval-every",
        "20",
        "--save-every",
        "1",
        "--lora-rank",
        "4",
        "--lora-targets",
        "c_attn,c_proj,c_fc,wpe",
        "--lora-dropout",
        "0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (k, v) in [
        ("--tokenizer", tok),
        ("--data", text),
        ("--out", d.join(out)),
    ] {
        args.extend([k.to_string(), v.display().to_string()]);
    }
    args
}
