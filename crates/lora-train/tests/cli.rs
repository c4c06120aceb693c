//! The `lora-train` binary end to end: data inspection, news cleaning, and a training run that
//! survives SIGKILL. (Bad inputs: `bad_inputs.rs`.)

mod common;

use common::{run, scratch, strs, tiny_run};
use std::path::Path;
use std::process::Command;

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

#[test]
fn alpaca_inspect_json() {
    let d = scratch("alpaca");
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
fn clean_news() {
    let d = scratch("news");
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
    std::fs::remove_dir_all(&d).unwrap();
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

#[test]
fn finetune_in_f16_lowers_the_loss_like_f32() {
    let d = scratch("f16");
    let losses = |name: &str, extra: &[&str]| {
        let mut args = tiny_run(&d, name);
        args.extend(extra.iter().map(|s| s.to_string()));
        let (code, _, err) = run(&strs(&args));
        assert_eq!(code, 0, "{err}");
        let m = metrics(&d.join(name));
        let train: Vec<f64> = m.iter().filter(|r| r.1 == "train").map(|r| r.2).collect();
        let val: Vec<f64> = m.iter().filter(|r| r.1 == "val").map(|r| r.2).collect();
        (train, val)
    };
    let (t32, v32) = losses("f32", &[]);
    let (t16, v16) = losses("f16", &["--precision", "f16"]);
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("f16/run.json")).unwrap()).unwrap();
    assert_eq!(run_json["config"]["precision"], "f16", "{run_json}");
    for (t, v) in [(&t32, &v32), (&t16, &v16)] {
        assert!(t.last() < t.first(), "train loss did not go down: {t:?}");
        assert!(v.last() < v.first(), "val loss did not go down: {v:?}");
    }
    // Half precision really ran (other roundings) and follows the f32 curve.
    assert_ne!(t16, t32);
    let gap = (v16.last().unwrap() - v32.last().unwrap()).abs();
    assert!(
        gap < 0.05 * v32.last().unwrap(),
        "f16 {v16:?} vs f32 {v32:?}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}
