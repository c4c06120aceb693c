//! Every bad input the `lora-train` CLI is known to meet, as one catalogue. Each case runs the
//! binary in a fresh scratch folder and must exit non-zero with one `error: ` line naming the file
//! or flag and the problem, without a panic, and leave no file behind (no partial output, no temp
//! file). The catalogue is also the table in `docs/bad-inputs.md`:
//! `LORA_BLESS=1 cargo test --workspace --release --test bad_inputs` rewrites it; otherwise this test
//! fails when the table and the messages differ.

mod common;

use common::{run_in, tiny_args, tiny_text};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

type Setup = Box<dyn Fn(&Path)>;

struct Case {
    group: &'static str,
    what: &'static str,
    setup: Setup,
    args: Vec<String>,
    /// The command as the table shows it.
    shown: String,
    /// Substrings the error line must contain.
    parts: Vec<&'static str>,
    /// Exit code (clap's usage errors exit 2).
    code: i32,
    /// A folder the run may leave behind (a diverging run keeps its last good checkpoint).
    keeps: Option<&'static str>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The scratch folder every case starts from: `model/` (gpt2-micro: 2 layers, 32 wide, vocab 512,
/// plus the GPT-2 tokenizer), `adapter/` (its PEFT adapter, r 4), `t.txt`.
fn prepare(dir: &Path) {
    let micro = fixtures().join("lora-gpt/tests/fixtures/gpt2-micro");
    for (sub, files) in [
        (
            "model",
            &["config.json", "generation_config.json", "model.safetensors"][..],
        ),
        (
            "adapter",
            &["adapter_config.json", "adapter_model.safetensors"][..],
        ),
    ] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for f in files {
            std::fs::copy(micro.join(sub).join(f), dir.join(sub).join(f)).unwrap();
        }
    }
    std::fs::copy(
        fixtures().join("lora-data/tests/fixtures/gpt2-tokenizer.json"),
        dir.join("model/tokenizer.json"),
    )
    .unwrap();
    tiny_text(dir);
}

/// Every file under `dir`, relative.
fn files(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn edit_json(file: &'static str, f: impl Fn(&mut serde_json::Value) + 'static) -> Setup {
    Box::new(move |d| {
        let p = d.join(file);
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    })
}

fn write(file: &'static str, body: &'static [u8]) -> Setup {
    Box::new(move |d| std::fs::write(d.join(file), body).unwrap())
}

fn remove(file: &'static str) -> Setup {
    Box::new(move |d| std::fs::remove_file(d.join(file)).unwrap())
}

fn none() -> Setup {
    Box::new(|_| {})
}

/// A safetensors file rewritten: `(name, dtype, shape, bytes)` edited by `f`.
type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

fn edit_tensors(file: &'static str, f: impl Fn(&mut Vec<Raw>) + 'static) -> Setup {
    Box::new(move |d| {
        let p = d.join(file);
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut raw: Vec<Raw> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        raw.sort_by(|a, b| a.0.cmp(&b.0));
        f(&mut raw);
        let views: Vec<(String, safetensors::tensor::TensorView)> = raw
            .iter()
            .map(|(k, dt, s, b)| {
                (
                    k.clone(),
                    safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `tiny_run`'s finetune command (relative to the scratch folder) with `set` flags replaced or
/// added (an empty value removes the flag).
fn finetune(set: &[(&str, &str)]) -> (Vec<String>, String) {
    let mut a: Vec<String> = tiny_args(Path::new("."), "run")
        .into_iter()
        .map(|s| s.strip_prefix("./").map(str::to_string).unwrap_or(s))
        .collect();
    let mut shown = vec!["finetune".to_string(), "…".into()];
    for (flag, v) in set {
        if v.is_empty() {
            if let Some(i) = a.iter().position(|x| x == flag) {
                a.drain(i..i + 2);
            }
            continue;
        }
        match a.iter().position(|x| x == flag) {
            Some(i) => a[i + 1] = v.to_string(),
            None => a.extend([flag.to_string(), v.to_string()]),
        }
        shown.push(format!("{flag} {v}"));
    }
    (a, shown.join(" "))
}

fn case(
    group: &'static str,
    what: &'static str,
    setup: Setup,
    cmd: &str,
    parts: &[&'static str],
) -> Case {
    Case {
        group,
        what,
        setup,
        args: args(cmd),
        shown: cmd.to_string(),
        parts: parts.to_vec(),
        code: 1,
        keeps: None,
    }
}

fn ft_case(what: &'static str, setup: Setup, set: &[(&str, &str)], parts: &[&'static str]) -> Case {
    let (args, shown) = finetune(set);
    Case {
        group: "flags",
        what,
        setup,
        args,
        shown,
        parts: parts.to_vec(),
        code: 1,
        keeps: None,
    }
}

const MERGE: &str = "merge --model model --adapter adapter --out out";

fn catalogue() -> Vec<Case> {
    let inspect = |dataset: &str, file: &str| {
        format!("data inspect --dataset {dataset} --data {file} --model model")
    };
    let mut c = vec![
        // Model folders.
        case(
            "model folder",
            "no config.json",
            remove("model/config.json"),
            MERGE,
            &["model/config.json", "file not found"],
        ),
        case(
            "model folder",
            "no model.safetensors",
            remove("model/model.safetensors"),
            MERGE,
            &["model/model.safetensors", "file not found"],
        ),
        case(
            "model folder",
            "no tokenizer.json",
            remove("model/tokenizer.json"),
            "generate --model model --prompt hi",
            &["model/tokenizer.json", "file not found"],
        ),
        case(
            "model folder",
            "the folder does not exist",
            none(),
            "eval --model nowhere --text t.txt",
            &["nowhere"],
        ),
        case(
            "model folder",
            "config.json is not JSON",
            write("model/config.json", b"{\"n_embd\": 32,"),
            MERGE,
            &["model/config.json", "not a GPT-2 config"],
        ),
        case(
            "model folder",
            "unsupported activation_function",
            edit_json("model/config.json", |v| {
                v["activation_function"] = "swish".into()
            }),
            MERGE,
            &["model/config.json", "activation_function 'swish'"],
        ),
        case(
            "model folder",
            "n_embd not divisible by n_head",
            edit_json("model/config.json", |v| v["n_head"] = 5.into()),
            MERGE,
            &["model/config.json", "not divisible by n_head 5"],
        ),
        case(
            "model folder",
            "model.safetensors truncated",
            Box::new(|d| {
                let p = d.join("model/model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            MERGE,
            &["model/model.safetensors", "not a valid safetensors file"],
        ),
        case(
            "model folder",
            "model.safetensors with a corrupt header",
            write(
                "model/model.safetensors",
                b"\x20\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\": \"F32\", \"shape\"",
            ),
            MERGE,
            &["model/model.safetensors", "not a valid safetensors file"],
        ),
        case(
            "model folder",
            "a tensor of the wrong shape",
            edit_tensors("model/model.safetensors", |t| {
                let e = t.iter_mut().find(|e| e.0 == "transformer.h.0.ln_1.weight").unwrap();
                (e.2, e.3) = (vec![31], f32_bytes(&[1.0; 31]));
            }),
            MERGE,
            &["model/model.safetensors", "has shape [31], expected [32]"],
        ),
        case(
            "model folder",
            "a tensor of the wrong dtype",
            edit_tensors("model/model.safetensors", |t| {
                let e = t.iter_mut().find(|e| e.0 == "transformer.h.0.ln_1.weight").unwrap();
                e.1 = Dtype::I32;
            }),
            MERGE,
            &["model/model.safetensors", "dtype I32"],
        ),
        case(
            "model folder",
            "a missing tensor",
            edit_tensors("model/model.safetensors", |t| {
                t.retain(|e| e.0 != "transformer.ln_f.bias")
            }),
            MERGE,
            &["model/model.safetensors", "missing tensor 'transformer.ln_f.bias'"],
        ),
        case(
            "model folder",
            "a tokenizer with more tokens than the model's vocabulary",
            none(),
            "generate --model model --prompt hi",
            &["model/tokenizer.json", "50257 tokens", "vocab_size 512"],
        ),
        // PEFT adapters.
        case(
            "adapter",
            "r = 0",
            edit_json("adapter/adapter_config.json", |v| v["r"] = 0.into()),
            MERGE,
            &["adapter/adapter_config.json", "r must be at least 1"],
        ),
        case(
            "adapter",
            "r larger than min(in, out) of the targeted layers",
            edit_json("adapter/adapter_config.json", |v| v["r"] = 4096.into()),
            MERGE,
            &["adapter/adapter_config.json", "r 4096 is larger than min(in, out) = 32"],
        ),
        case(
            "adapter",
            "negative lora_alpha",
            edit_json("adapter/adapter_config.json", |v| {
                v["lora_alpha"] = (-8.0).into()
            }),
            MERGE,
            &["adapter/adapter_config.json", "lora_alpha -8"],
        ),
        case(
            "adapter",
            "lora_dropout outside [0, 1) (found by fuzzing)",
            edit_json("adapter/adapter_config.json", |v| {
                v["lora_dropout"] = 5.0.into()
            }),
            MERGE,
            &["adapter/adapter_config.json", "lora_dropout 5 must be in [0, 1)"],
        ),
        case(
            "adapter",
            "unknown peft_type",
            edit_json("adapter/adapter_config.json", |v| {
                v["peft_type"] = "IA3".into()
            }),
            MERGE,
            &["adapter/adapter_config.json", "peft_type 'IA3'"],
        ),
        case(
            "adapter",
            "target_modules matching nothing in GPT-2",
            edit_json("adapter/adapter_config.json", |v| {
                v["target_modules"] = serde_json::json!(["q_proj", "v_proj"])
            }),
            MERGE,
            &["adapter/adapter_config.json", "'q_proj'"],
        ),
        case(
            "adapter",
            "fan_in_fan_out false for GPT-2's Conv1D layers",
            edit_json("adapter/adapter_config.json", |v| {
                v["fan_in_fan_out"] = false.into()
            }),
            MERGE,
            &["adapter/adapter_config.json", "fan_in_fan_out is false"],
        ),
        case(
            "adapter",
            "adapter tensors whose shapes do not fit the model",
            edit_json("adapter/adapter_config.json", |v| v["r"] = 3.into()),
            MERGE,
            &["adapter/adapter_model.safetensors", "has shape [4, 32], expected [3, 32]"],
        ),
        case(
            "adapter",
            "no adapter_model.safetensors",
            remove("adapter/adapter_model.safetensors"),
            MERGE,
            &["adapter/adapter_model.safetensors", "file not found"],
        ),
        case(
            "adapter",
            "merged weights would be non-finite (PEFT's safe_merge)",
            edit_tensors("adapter/adapter_model.safetensors", |t| {
                for e in t.iter_mut().filter(|e| e.0.contains("h.0.attn.c_attn")) {
                    let n = e.2.iter().product::<usize>();
                    e.3 = f32_bytes(&vec![1e30; n]);
                }
            }),
            MERGE,
            &["adapter", "non-finite", "nothing written"],
        ),
        // Data files.
        case(
            "data",
            "Alpaca JSON that is not JSON",
            write("a.json", b"hello"),
            &inspect("alpaca", "a.json"),
            &["a.json", "not JSON"],
        ),
        case(
            "data",
            "Alpaca JSON truncated",
            write(
                "a.json",
                br#"[{"instruction": "x", "output": "y"}, {"instruction": "#,
            ),
            &inspect("alpaca", "a.json"),
            &["a.json", "truncated JSON"],
        ),
        case(
            "data",
            "Alpaca JSON not an array of rows",
            write("a.json", br#""a string""#),
            &inspect("alpaca", "a.json"),
            &["a.json", "not an array of rows"],
        ),
        case(
            "data",
            "an Alpaca row without output",
            write(
                "a.json",
                br#"[{"instruction": "x", "output": "y"}, {"instruction": "z"}]"#,
            ),
            &inspect("alpaca", "a.json"),
            &["a.json", "row 1", "output"],
        ),
        case(
            "data",
            "an Alpaca row without instruction",
            write("a.json", br#"[{"output": "y"}]"#),
            &inspect("alpaca", "a.json"),
            &["a.json", "row 0", "instruction"],
        ),
        case(
            "data",
            "an Alpaca field of the wrong type",
            write("a.json", br#"[{"instruction": 3, "output": "y"}]"#),
            &inspect("alpaca", "a.json"),
            &["a.json", "row 0", "invalid type"],
        ),
        case(
            "data",
            "an empty data file",
            write("a.json", b"  \n"),
            &inspect("alpaca", "a.json"),
            &["a.json", "empty file"],
        ),
        case(
            "data",
            "bytes that are not UTF-8",
            write(
                "a.json",
                b"[{\"instruction\": \"caf\xe9\", \"output\": \"y\"}]",
            ),
            &inspect("alpaca", "a.json"),
            &["a.json", "invalid JSON"],
        ),
        case(
            "data",
            "a news CSV without the NewsType column",
            write("a.csv", b"Article,Date,Heading\r\nx,y,z\r\n"),
            &inspect("news", "a.csv"),
            &["a.csv", "missing column 'NewsType'"],
        ),
        case(
            "data",
            "a news CSV with a short row",
            write("a.csv", b"Article,Date,Heading,NewsType\r\nx,y\r\n"),
            &inspect("news", "a.csv"),
            &["a.csv", "bad CSV"],
        ),
        case(
            "data",
            "a news CSV with a bad quote",
            write(
                "a.csv",
                b"Article,Date,Heading,NewsType\r\n\"unclosed,1/1/2015,H,sports\r\nx,1/2/2015,H,sports\r\n",
            ),
            &inspect("news", "a.csv"),
            &["a.csv"],
        ),
        case(
            "data",
            "an empty news CSV",
            write("a.csv", b""),
            &inspect("news", "a.csv"),
            &["a.csv", "empty file"],
        ),
        case(
            "data",
            "an unknown NewsType",
            write("a.csv", b"Article,Date,Heading,NewsType\r\nx,1/1/2015,H,sports\r\n"),
            "data clean-news --input a.csv --output out.txt --news-type sport",
            &["a.csv", "NewsType 'sport'"],
        ),
        case(
            "data",
            "a text shorter than one block",
            write("a.txt", b"hello world, hello world"),
            &format!("{} --block-size 64", inspect("text", "a.txt")),
            &["a.txt", "no sequence of 64 tokens"],
        ),
        // Flags.
        case(
            "flags",
            "--block-size below 2",
            write("a.txt", b"hello world, hello world"),
            &format!("{} --block-size 1", inspect("text", "a.txt")),
            &["--block-size", "at least 2"],
        ),
        ft_case(
            "--lora-rank larger than min(in, out)",
            none(),
            &[("--lora-rank", "49")],
            &["--lora-rank 49", "min(in, out) = 48"],
        ),
        ft_case(
            "--block-size larger than n_positions",
            none(),
            &[("--block-size", "2048")],
            &["--block-size 2048", "n_positions 1024"],
        ),
        ft_case(
            "--max-seq-len larger than n_positions",
            write("a.json", br#"[{"instruction": "x", "output": "y"}]"#),
            &[
                ("--dataset", "alpaca"),
                ("--data", "a.json"),
                ("--block-size", ""),
                ("--max-seq-len", "4096"),
            ],
            &["--max-seq-len 4096", "n_positions 1024"],
        ),
        ft_case(
            "--batch-size 0",
            none(),
            &[("--batch-size", "0")],
            &["--batch-size"],
        ),
        ft_case(
            "--lora-targets naming no GPT layer",
            none(),
            &[("--lora-targets", "q_proj")],
            &["unknown LoRA target 'q_proj'"],
        ),
        ft_case(
            "a step too large for the GPU's buffers",
            none(),
            &[("--backend", "wgpu"), ("--batch-size", "1000000000")],
            &["--backend wgpu", "the MLP's hidden activations", "binds per buffer"],
        ),
        ft_case(
            "an unknown --scaling",
            none(),
            &[("--scaling", "sqrt")],
            &["--scaling 'sqrt'"],
        ),
        Case {
            code: 2,
            ..case(
                "flags",
                "an unknown --backend",
                none(),
                "sort-demo --backend tpu",
                &["invalid value 'tpu'"],
            )
        },
        // Outputs.
        ft_case(
            "a file in the way of the output folder",
            write("run", b"x"),
            &[],
            &["run", "is a file"],
        ),
        case(
            "output",
            "an output path inside a file (not writable)",
            write("a.csv", b"Article,Date,Heading,NewsType\r\nx,1/1/2015,H,sports\r\n"),
            "data clean-news --input a.csv --output a.csv/out.txt",
            &["a.csv/out.txt", "cannot write"],
        ),
        case(
            "output",
            "a folder in the way of the output file",
            Box::new(|d| {
                std::fs::write(
                    d.join("a.csv"),
                    b"Article,Date,Heading,NewsType\r\nx,1/1/2015,H,sports\r\n",
                )
                .unwrap();
                std::fs::create_dir(d.join("out.txt")).unwrap();
            }),
            "data clean-news --input a.csv --output out.txt",
            &["out.txt", "cannot write"],
        ),
        Case {
            keeps: Some("run/"),
            ..ft_case(
                "the loss becomes NaN or inf (stop, keep the last good checkpoint)",
                none(),
                &[
                    ("--lr", "1e30"),
                    ("--warmup", "0"),
                    ("--lora-targets", "c_attn"),
                    ("--lora-dropout", "0"),
                    ("--clip", "0"),
                    ("--schedule", "constant"),
                ],
                &["loss is", "at step", "stopped", "last good checkpoint"],
            )
        },
    ];
    for x in c.iter_mut() {
        if x.what.starts_with("a file in the way") {
            x.group = "output";
        }
        if x.what.starts_with("the loss becomes") {
            x.group = "training";
        }
    }
    c
}

/// The error line as the table shows it: a diverging run's step and loss depend on the CPU.
fn shown_error(what: &str, line: &str) -> String {
    if what.starts_with("a step too large") {
        // "… above the 128.0 MiB this device binds …": the limit is the driver's.
        if let (Some(a), Some(b)) = (line.find("above the "), line.find(" MiB this device")) {
            return format!("{}above the …{}", &line[..a], &line[b..]);
        }
    }
    if !what.starts_with("the loss becomes") {
        return line.to_string();
    }
    // "loss is NaN at step 3: stopped; …"
    let mut words: Vec<String> = line.split(' ').map(str::to_string).collect();
    for i in 1..words.len() {
        if (i >= 2 && words[i - 2] == "loss" && words[i - 1] == "is") || words[i - 1] == "step" {
            let tail = if words[i].ends_with(':') { ":" } else { "" };
            words[i] = format!("…{tail}");
        }
    }
    words.join(" ")
}

#[test]
fn every_bad_input_gets_one_clear_line_and_leaves_nothing() {
    let root = std::env::temp_dir().join(format!("lora-bad-inputs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut table = String::from(
        "# Bad inputs and the errors they give\n\n\
         Generated by `crates/lora-train/tests/bad_inputs.rs` (each row is a test: the command runs in a \
         folder holding a small GPT-2 `model/`, its PEFT `adapter/` and the named data file; it must \
         exit non-zero with this one line on stderr, no panic, and leave no file behind). Rewrite with \
         `LORA_BLESS=1 cargo test --workspace --release --test bad_inputs`.\n\n\
         | # | group | bad input | command (`lora-train …`) | exit | error |\n|---|---|---|---|---|---|\n",
    );
    let mut failures = vec![];
    for (i, c) in catalogue().iter().enumerate() {
        let dir = root.join(i.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        prepare(&dir);
        (c.setup)(&dir);
        let before = files(&dir);
        let (code, _, err) = run_in(&dir, &c.args);
        let first = err.lines().next().unwrap_or("").to_string();
        let mut problems = vec![];
        if code != c.code {
            problems.push(format!("exit {code}, expected {}", c.code));
        }
        if err.contains("panicked") {
            problems.push("panicked".into());
        }
        if !first.starts_with("error: ") {
            problems.push("no 'error: ' line".into());
        }
        if c.code == 1 && err.trim_end().lines().count() != 1 {
            problems.push("more than one line".into());
        }
        for p in &c.parts {
            if !first.contains(p) {
                problems.push(format!("lacks {p:?}"));
            }
        }
        let left: Vec<String> = files(&dir)
            .difference(&before)
            .filter(|f| {
                c.keeps
                    .is_none_or(|k| !f.starts_with(k) && f.as_str() != k.trim_end_matches('/'))
            })
            .cloned()
            .collect();
        if !left.is_empty() {
            problems.push(format!("left files {left:?}"));
        }
        if c.keeps.is_some() {
            if !dir.join("run/checkpoint/state.json").exists() {
                problems.push("no checkpoint kept".into());
            }
            if dir.join("run/adapter").exists() {
                problems.push("wrote an adapter".into());
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} ({}): {}\n    {err}",
                c.what,
                c.shown,
                problems.join("; ")
            ));
        }
        let msg = shown_error(c.what, first.trim_start_matches("error: "));
        table.push_str(&format!(
            "| {} | {} | {} | `{}` | {} | {} |\n",
            i + 1,
            c.group,
            c.what,
            c.shown,
            code,
            msg.replace('|', "\\|")
        ));
    }
    let _ = std::fs::remove_dir_all(&root);
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    let doc = fixtures().join("../docs/bad-inputs.md");
    if std::env::var_os("LORA_BLESS").is_some() {
        std::fs::create_dir_all(doc.parent().unwrap()).unwrap();
        std::fs::write(&doc, &table).unwrap();
    } else {
        let committed = std::fs::read_to_string(&doc).unwrap_or_default();
        assert!(
            committed == table,
            "docs/bad-inputs.md is not what the tests give; rewrite it with \
             LORA_BLESS=1 cargo test --workspace --release --test bad_inputs\n{table}"
        );
    }
}
