//! The `lora-train` binary on bad inputs: one clear line naming the file and the problem, a
//! non-zero exit, no panic, no output file.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh folder with a model folder holding the GPT-2 tokenizer.
fn scratch(name: &str) -> PathBuf {
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
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lora-train"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Expect failure with a single `error: ` line containing each of `parts`.
fn fails(args: &[&str], parts: &[&str]) {
    let (code, _, err) = run(args);
    assert_ne!(code, 0, "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    for p in parts {
        assert!(err.contains(p), "{args:?}: {err:?} lacks {p:?}");
    }
}

fn inspect(dir: &Path, dataset: &str, file: &str, body: &[u8]) -> Vec<String> {
    let path = dir.join(file);
    std::fs::write(&path, body).unwrap();
    ["data", "inspect", "--dataset", dataset, "--data"]
        .iter()
        .map(|s| s.to_string())
        .chain([path.display().to_string(), "--model".into()])
        .chain([dir.join("model").display().to_string()])
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn bad_alpaca_files() {
    let d = scratch("alpaca");
    let cases: [(&str, &[u8], &[&str]); 7] = [
        ("a.json", b"hello", &["a.json", "not JSON"]),
        (
            "b.json",
            br#"[{"instruction": "x", "output": "y"}, {"instruction": "#,
            &["b.json", "truncated JSON"],
        ),
        (
            "c.json",
            br#"[{"instruction": "x", "output": "y"}, {"instruction": "z"}]"#,
            &["c.json", "row 1", "output"],
        ),
        (
            "d.json",
            br#"[{"output": "y"}]"#,
            &["d.json", "row 0", "instruction"],
        ),
        (
            "e.json",
            br#"[{"instruction": 3, "output": "y"}]"#,
            &["e.json", "row 0", "invalid type"],
        ),
        ("f.json", b"  \n", &["f.json", "empty file"]),
        (
            "g.json",
            b"[{\"instruction\": \"caf\xe9\", \"output\": \"y\"}]",
            &["g.json", "invalid JSON"],
        ),
    ];
    for (file, body, parts) in cases {
        fails(&strs(&inspect(&d, "alpaca", file, body)), parts);
    }
    // A good file passes, and its figures come out as JSON.
    let mut args = inspect(
        &d,
        "alpaca",
        "ok.jsonl",
        b"{\"instruction\": \"Say hi\", \"output\": \"Hi\"}\n{\"instruction\": \"Add\", \"input\": \"1 2\", \"output\": \"3\"}\n",
    );
    args.extend(["--json".into(), "--max-seq-len".into(), "8".into()]);
    let (code, out, err) = run(&strs(&args));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["rows"].as_u64(), v["rows_with_input"].as_u64()),
        (Some(2), Some(1))
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn bad_news_files_and_clean_news() {
    let d = scratch("news");
    fails(
        &strs(&inspect(
            &d,
            "news",
            "a.csv",
            b"Article,Date,Heading\r\nx,y,z\r\n",
        )),
        &["a.csv", "missing column 'NewsType'"],
    );
    fails(
        &strs(&inspect(&d, "news", "b.csv", b"")),
        &["b.csv", "empty file"],
    );
    fails(
        &strs(&inspect(
            &d,
            "news",
            "c.csv",
            b"Article,Date,Heading,NewsType\r\nx,y\r\n",
        )),
        &["c.csv", "bad CSV"],
    );
    let csv = d.join("ok.csv");
    std::fs::write(
        &csv,
        b"Article,Date,Heading,NewsType\r\n\"Caf\xe9  opens,\r\n 2 days\",1/1/2015,H,business\r\nWin 3-1,1/2/2015,H2,sports\r\n,1/3/2015,H3,sports\r\n",
    )
    .unwrap();
    let out = d.join("out/Articles.txt");
    let (o, c) = (out.display().to_string(), csv.display().to_string());
    let (code, stdout, err) = run(&["data", "clean-news", "--input", &c, "--output", &o]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("2 of 3 rows"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "Caf\u{e9} opens, 2 daysWin 3-1"
    );
    // An unknown NewsType: an error listing the types, and no output file.
    let other = d.join("other.txt").display().to_string();
    let args = ["data", "clean-news", "--input", &c, "--output", &other];
    fails(
        &[&args[..], &["--news-type", "sport"]].concat(),
        &["ok.csv", "NewsType 'sport'", "business, sports"],
    );
    assert!(!d.join("other.txt").exists());
    // A folder in the way of the output.
    std::fs::create_dir_all(d.join("dir.txt")).unwrap();
    let blocked = d.join("dir.txt").display().to_string();
    fails(
        &["data", "clean-news", "--input", &c, "--output", &blocked],
        &["dir.txt", "cannot write"],
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn bad_flags() {
    let d = scratch("flags");
    let mut args = inspect(&d, "text", "t.txt", b"hello world, hello world");
    args.extend(["--block-size".into(), "64".into()]);
    fails(&strs(&args), &["t.txt", "no sequence of 64 tokens"]);
    args.truncate(args.len() - 2);
    args.extend(["--block-size".into(), "1".into()]);
    fails(&strs(&args), &["--block-size", "at least 2"]);
    // finetune flags checked against the model before any work.
    let d2 = scratch("flags2");
    let base = tiny_run(&d2, "bad");
    let with = |set: &[&str]| {
        let mut a = base.clone();
        let i = a.iter().position(|x| x == set[0]).unwrap();
        a[i + 1] = set[1].to_string();
        a
    };
    fails(
        &strs(&with(&["--lora-rank", "49"])),
        &["--lora-rank 49", "min(in, out) = 48"],
    );
    fails(
        &strs(&with(&["--block-size", "2048"])),
        &["--block-size 2048", "n_positions 1024"],
    );
    fails(&strs(&with(&["--batch-size", "0"])), &["--batch-size"]);
    fails(
        &strs(&with(&["--lora-targets", "q_proj"])),
        &["unknown LoRA target 'q_proj'"],
    );
    let mut a = base.clone();
    a.extend(["--scaling".to_string(), "sqrt".to_string()]);
    fails(&strs(&a), &["--scaling 'sqrt'"]);
    std::fs::write(d2.join("file-out"), b"x").unwrap();
    let mut a = base.clone();
    let n = a.len();
    a[n - 1] = d2.join("file-out").display().to_string();
    fails(&strs(&a), &["file-out", "is a file"]);
    assert!(!d2.join("bad").exists(), "nothing written for bad flags");
    // A diverging run stops at the first non-finite loss, keeps its last checkpoint, writes no adapter.
    let mut a = with(&["--lr", "1e30"]);
    for (flag, v) in [
        ("--warmup", "0"),
        ("--lora-targets", "c_attn"),
        ("--lora-dropout", "0"),
    ] {
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = v.into();
    }
    a.extend(["--clip", "0", "--schedule", "constant"].map(String::from));
    fails(
        &strs(&a),
        &["loss is", "at step", "stopped", "last good checkpoint"],
    );
    assert!(d2.join("bad/checkpoint/state.json").exists());
    assert!(!d2.join("bad/adapter").exists());
    std::fs::remove_dir_all(&d2).unwrap();
    let (code, _, err) = run(&["sort-demo", "--backend", "tpu"]);
    assert_eq!(code, 2, "clap's usage exit code");
    assert!(err.contains("invalid value 'tpu'"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A tiny LoRA run (gpt-nano shapes, GPT-2 tokenizer, 40 steps of 2 × 16 tokens).
fn tiny_run(d: &Path, out: &str) -> Vec<String> {
    let text = d.join("t.txt");
    if !text.exists() {
        let line =
            "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.\n";
        std::fs::write(&text, line.repeat(12)).unwrap();
    }
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

/// Step of `out/checkpoint/state.json`, if one is complete.
fn checkpoint_step(out: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(out.join("checkpoint/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&s).ok()?["step"].as_u64()
}

/// `metrics.jsonl` without the timing field.
fn metrics(out: &Path) -> Vec<(u64, String, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["split"].as_str().unwrap().to_string(),
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn finetune_resumes_bit_identically_after_sigkill() {
    let d = scratch("resume");
    let full = tiny_run(&d, "full");
    let (code, _, err) = run(&strs(&full));
    assert_eq!(code, 0, "{err}");
    let adapter =
        |out: &str| std::fs::read(d.join(out).join("adapter/adapter_model.safetensors")).unwrap();
    let reference = adapter("full");
    for kill_at in [3, 11, 24] {
        let name = format!("killed{kill_at}");
        let args = tiny_run(&d, &name);
        let mut child = Command::new(env!("CARGO_BIN_EXE_lora-train"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = d.join(&name);
        while checkpoint_step(&out).is_none_or(|s| s < kill_at) {
            assert!(child.try_wait().unwrap().is_none(), "the run ended early");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(child.try_wait().unwrap().is_none(), "killed mid-run");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(!out.join("adapter").exists(), "no adapter before the end");
        let mut resume = args.clone();
        resume.push("--resume".into());
        let (code, stdout, err) = run(&strs(&resume));
        assert_eq!(code, 0, "{err}");
        assert!(stdout.contains("resumed from step"), "{stdout}");
        assert!(
            adapter(&name) == reference,
            "adapter after a kill at step ≥ {kill_at} differs"
        );
        assert_eq!(metrics(&out), metrics(&d.join("full")));
    }
    // A corrupt newest checkpoint: a warning, and the one before it is used.
    let out = d.join("killed24");
    std::fs::write(out.join("checkpoint/optimizer.bpk"), b"garbage").unwrap();
    let mut resume = tiny_run(&d, "killed24");
    resume.push("--resume".into());
    let (code, stdout, err) = run(&strs(&resume));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(stdout.contains("resumed from step 39"), "{stdout}");
    assert!(adapter("killed24") == reference);
    std::fs::remove_dir_all(&d).unwrap();
}
