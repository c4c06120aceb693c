//! `lora-train bench`: `infer` (GPT-2-small-shaped forward pass, base vs LoRA unmerged vs merged)
//! and `data` (dataset loading). Each prints a table and writes `target/bench/<suite>.json`.

use crate::Backend;
use crate::finetune::{Compute, Precision, Settling};
use crate::fsutil::write_json_atomic;
use anyhow::Context;
use burn::module::Module;
use burn::tensor::{Device, Distribution, Int, Tensor};
use lora_core::{LoraMerge, LossScaler, Scaling};
use lora_gpt::{Gpt, GptConfig, LoraTargets};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// One measured variant.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Row {
    /// Variant name.
    pub name: String,
    /// Milliseconds per forward pass.
    pub ms: f64,
    /// Tokens per second (None where no tokens are made).
    pub tokens_per_s: Option<f64>,
    /// Peak memory: process RSS on the CPU; on a GPU the device memory Burn's allocator reserves
    /// (`bench finetune`: `gpu_memory_peaks`).
    pub peak_mib: Option<f64>,
    /// GPU only: the peak of the bytes live tensors use (PyTorch's `max_memory_allocated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use_mib: Option<f64>,
    /// `bench finetune --rounds N`: each round's `ms` (the row is the median round).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds_ms: Option<Vec<f64>>,
}

/// `reps` forward passes queued back to back, the last one read back so all the work is done
/// (one device sync per `reps` passes, as a serving loop would have).
fn forward_reps(model: &Gpt, idx: &Tensor<2, Int>, reps: usize, all_logits: bool) {
    let mut last = None;
    for _ in 0..reps {
        last = Some(if all_logits {
            let logits = model.forward(idx.clone());
            let [b, t, v] = logits.dims();
            logits.narrow(1, t - 1, 1).reshape([b, v])
        } else {
            model.last_logits(idx.clone())
        });
    }
    let _ = last.expect("reps >= 1").into_data();
}

/// Median ms per forward pass of each model: `warmup` rounds of all (autotuning happens there),
/// then `iters` rounds, interleaved so drifts (clocks, other load) hit every variant alike, each
/// round in its own shuffled order, and each timed batch after one untimed pass of the same
/// model, so none always pays for what the model before it left behind. (A fixed cyclic order
/// put the merged model straight after the unmerged one every round; on an H100 whichever model
/// ran there was 0.5–1.2 % slower, merged and base alike.)
fn time_forward(
    models: &[&Gpt],
    names: &[&str],
    idx: &Tensor<2, Int>,
    warmup: usize,
    b: &InferBench,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let (iters, reps, all_logits) = (b.iters, b.reps.max(1), b.all_logits);
    for _ in 0..warmup {
        models
            .iter()
            .for_each(|m| forward_reps(m, idx, reps, all_logits));
    }
    let mut ms = vec![vec![]; models.len()];
    let mut cpu = vec![vec![]; models.len()];
    for round in 0..iters {
        for i in round_order(round, models.len()) {
            let t_switch = Instant::now();
            forward_reps(models[i], idx, 1, all_logits);
            let switch_ms = 1000.0 * t_switch.elapsed().as_secs_f64();
            let (t0, c0) = (Instant::now(), process_cpu_ms());
            forward_reps(models[i], idx, reps, all_logits);
            ms[i].push(1000.0 * t0.elapsed().as_secs_f64() / reps as f64);
            if let (Some(c0), Some(c1)) = (c0, process_cpu_ms()) {
                cpu[i].push((c1 - c0) / reps as f64);
            }
            if b.trace {
                let c = cpu[i]
                    .last()
                    .map_or(String::new(), |c| format!(", {c:.0} ms CPU"));
                eprintln!(
                    "round {round} {}: {:.2} ms{c} (untimed pass before: {switch_ms:.2} ms)",
                    names[i],
                    ms[i][ms[i].len() - 1]
                );
            }
        }
    }
    (ms, cpu)
}

/// CPU time of this process (all threads, user + system) in ms, from `/proc/self/stat` (10 ms
/// ticks; `None` off Linux): with the wall time of a pass, it tells host work from waiting.
fn process_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    let (u, s): (f64, f64) = (f.next()?.parse().ok()?, f.next()?.parse().ok()?);
    Some((u + s) * 10.0)
}

/// Settings of the `infer` suite.
#[derive(Debug, Clone, Copy)]
pub struct InferBench {
    /// Backend.
    pub backend: Backend,
    /// Tokens per pass (batch 1).
    pub seq: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Adapted layers (block layers only).
    pub targets: LoraTargets,
    /// Timed rounds.
    pub iters: usize,
    /// Passes per round, read back once.
    pub reps: usize,
    /// Logits of every position (else only the last one's).
    pub all_logits: bool,
    /// Print every timed pass to stderr.
    pub trace: bool,
    /// Processes per variant (0: all variants in this process).
    pub isolate: usize,
    /// Time only this variant (index into [`INFER_VARIANTS`]) and print its row as JSON.
    pub only: Option<usize>,
}

/// The `infer` suite's variants.
pub const INFER_VARIANTS: [&str; 3] = ["base", "lora_unmerged", "lora_merged"];

/// Index of an `infer` variant by name.
pub fn infer_variant(name: &str) -> anyhow::Result<usize> {
    INFER_VARIANTS
        .iter()
        .position(|v| *v == name)
        .with_context(|| format!("--only {name}: not an infer variant ({INFER_VARIANTS:?})"))
}

/// `--isolate N`: every variant in its own processes, N each, rounds in a seeded shuffled order.
fn infer_isolated(b: &InferBench, out: &Path) -> anyhow::Result<serde_json::Value> {
    let flags = [
        ("--backend", b.backend.name().to_string()),
        ("--seq", b.seq.to_string()),
        ("--rank", b.rank.to_string()),
        ("--lora-targets", b.targets.to_string()),
        ("--iters", b.iters.to_string()),
        ("--reps", b.reps.to_string()),
        (
            "--logits",
            if b.all_logits { "all" } else { "last" }.to_string(),
        ),
    ];
    let mut per_process = vec![vec![]; INFER_VARIANTS.len()];
    for round in 0..b.isolate {
        for i in round_order(round, INFER_VARIANTS.len()) {
            let row = child_row("infer", INFER_VARIANTS[i], &flags)?;
            eprintln!("process {round} {}: {:.2} ms", INFER_VARIANTS[i], row.ms);
            per_process[i].push(row.ms);
        }
    }
    infer_report(b, per_process, None, out)
}

/// Round `round`'s order of `n` variants: a shuffle seeded by the round.
fn round_order(round: usize, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(round as u64));
    order
}

/// An `infer` row: `ms` per pass of `seq` tokens.
fn infer_row(name: &str, ms: f64, seq: usize) -> Row {
    Row {
        name: name.into(),
        ms,
        tokens_per_s: Some(seq as f64 / (ms / 1000.0)),
        ..Default::default()
    }
}

/// Run the `infer` suite.
pub fn infer(b: &InferBench, out: &Path) -> anyhow::Result<serde_json::Value> {
    let InferBench {
        backend,
        seq,
        rank,
        targets,
        ..
    } = *b;
    anyhow::ensure!(
        !targets.wte && !targets.wpe,
        "--lora-targets: the infer bench adapts block layers only (attn, mlp)"
    );
    if b.isolate > 0 && b.only.is_none() {
        anyhow::ensure!(
            !b.trace,
            "--trace prints one process's passes: not with --isolate"
        );
        return infer_isolated(b, out);
    }
    let device: Device = backend.device()?;
    device.seed(0);
    let cfg = GptConfig::from_model_type("gpt2", 50257, 1024)
        .map_err(anyhow::Error::msg)?
        .with_tie_word_embeddings(true)
        .with_lora_targets(LoraTargets::default());
    anyhow::ensure!((1..=1024).contains(&seq), "--seq must be in 1..=1024");
    crate::finetune::check_fits(&cfg, seq, Precision::F32, backend, &device)?;
    let base = cfg.init(&device).valid();
    let ids: Tensor<2, Int> =
        Tensor::<2>::random([1, seq], Distribution::Uniform(0.0, 50257.0), &device).int();
    let mut lora = base
        .clone()
        .add_lora(targets, rank, 16.0, 0.0, Scaling::AlphaOverRank);
    // Non-zero B, so the merge changes the weights.
    for b in lora.h.iter_mut() {
        let layers = [
            &mut b.attn.c_attn,
            &mut b.attn.c_proj,
            &mut b.mlp.c_fc,
            &mut b.mlp.c_proj,
        ];
        for l in layers {
            l.lora_b = l
                .lora_b
                .take()
                .map(|p| p.map(|t| t.random_like(Distribution::Normal(0.0, 0.02))));
        }
    }
    let merged = lora.clone().merge();
    let names = INFER_VARIANTS;
    if let Some(i) = b.only {
        // One variant alone (a child of `--isolate`): its row as JSON on the last line.
        let model = vec![base, lora, merged].swap_remove(i);
        let (samples, _) = time_forward(&[&model], &names[i..=i], &ids, 5, b);
        let row = infer_row(names[i], median(samples[0].clone()), seq);
        println!("{}", serde_json::to_string(&row)?);
        return Ok(serde_json::Value::Null);
    }
    let (samples, cpu) = time_forward(&[&base, &lora, &merged], &names, &ids, 5, b);
    infer_report(b, samples, Some(cpu), out)
}

/// Print the `infer` table and write its report, rows from the medians of `samples`: every pass
/// (in-process) or every process's median (`--isolate`).
fn infer_report(
    b: &InferBench,
    samples: Vec<Vec<f64>>,
    cpu: Option<Vec<Vec<f64>>>,
    out: &Path,
) -> anyhow::Result<serde_json::Value> {
    let rows: Vec<Row> = INFER_VARIANTS
        .iter()
        .zip(&samples)
        .map(|(name, v)| infer_row(name, median(v.clone()), b.seq))
        .collect();
    for r in &rows {
        println!(
            "{:>14}: {:9.2} ms  {:10.0} tokens/s",
            r.name,
            r.ms,
            r.tokens_per_s.unwrap_or(0.0)
        );
    }
    let ratio = |i: usize| rows[i].ms / rows[0].ms;
    let by_name = |v: &[Vec<f64>]| {
        INFER_VARIANTS
            .iter()
            .zip(v)
            .map(|(n, v)| (n.to_string(), v.clone().into()))
            .collect::<serde_json::Map<_, _>>()
    };
    let report = serde_json::json!({
        "suite": "infer",
        "backend": b.backend.name(),
        "machine": machine(),
        "shape": {"batch": 1, "seq": b.seq, "passes_per_sync": b.reps.max(1), "logits": if b.all_logits { "all positions" } else { "last position" }, "model": "gpt2 (124M, random weights)", "lora": format!("{} r{}", b.targets, b.rank)},
        "processes_per_variant": b.isolate,
        "rows": rows,
        "ratios": {"merged_over_base": ratio(2), "unmerged_over_base": ratio(1)},
        "samples_ms": by_name(&samples),
        "samples_cpu_ms": cpu.as_deref().map(by_name),
    });
    println!(
        "merged / base = {:.3}   unmerged / base = {:.3}",
        ratio(2),
        ratio(1)
    );
    write_report(out, report)
}

/// CPU model and core count, for reports.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{cpu}, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )
}

/// Peak resident memory of this process so far (Linux `VmHWM`), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    vm_hwm_mib("/proc/self/status")
}

/// `VmHWM` (peak resident memory) of a `/proc/PID/status` file, MiB.
fn vm_hwm_mib(status_path: &str) -> Option<f64> {
    let status = std::fs::read_to_string(status_path).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Write a suite's report to `out` (atomically) and say where.
fn write_report(out: &Path, report: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    write_json_atomic(out, &report)?;
    println!("report: {}", out.display());
    Ok(report)
}

/// Run one variant of a suite as `lora-train bench SUITE --only NAME FLAGS` in a child process (so
/// its peak RSS is its own) and read the [`Row`] it prints last.
fn child_row(suite: &str, name: &str, flags: &[(&str, String)]) -> anyhow::Result<Row> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["bench", suite, "--only", name]);
    for (flag, value) in flags {
        cmd.arg(flag);
        // An empty value: a switch.
        if !value.is_empty() {
            cmd.arg(value);
        }
    }
    let (stdout, err, ok, _) = run_measured(&mut cmd)?;
    anyhow::ensure!(ok, "bench {suite} {name}: {}", failure_line(&err));
    let mut row: Row = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .with_context(|| format!("bench {suite} {name}: no result"))?;
    row.name = name.into();
    Ok(row)
}

/// One line for a child's failure: its `error: …` line, else (a panic) the first line of the
/// panic message and its location.
fn failure_line(stderr: &str) -> String {
    let lines = || stderr.lines().map(str::trim).filter(|l| !l.is_empty());
    if let Some(e) = lines()
        .filter_map(|l| l.strip_prefix("error: "))
        .next_back()
    {
        return e.to_string();
    }
    let mut panic = lines().skip_while(|l| !l.starts_with("thread '"));
    match (panic.next(), panic.next()) {
        (Some(at), Some(what)) => format!("{what} ({})", at.trim_end_matches(':')),
        _ => lines()
            .next()
            .unwrap_or("failed with no message")
            .to_string(),
    }
}

/// Median wall time of `iters` calls of `f`, ms.
fn median_ms<T>(iters: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
    let mut ms = vec![];
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        f()?;
        ms.push(1000.0 * t0.elapsed().as_secs_f64());
    }
    Ok(median(ms))
}

/// The median of `v` (the upper one for an even count; `v` is not empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Run the `data` suite on the files of `data_dir` (`alpaca/alpaca_en_demo.json`,
/// `news-articles/Articles.csv`, `tinyshakespeare/input.txt`) with the tokenizer file `tokenizer`:
/// Alpaca load + tokenize + pack at 1024 (target < 1 s), `clean-news --cleaning original`
/// (target < 2 s), and news / text blocking for reference.
pub fn data(
    data_dir: &Path,
    tokenizer: &Path,
    iters: usize,
    out: &Path,
) -> anyhow::Result<serde_json::Value> {
    use crate::data::{self, Cleaning, DataOptions, Dataset};
    let tok = lora_data::Tokenizer::from_file(tokenizer)?;
    let alpaca = data_dir.join("alpaca/alpaca_en_demo.json");
    let articles = data_dir.join("news-articles/Articles.csv");
    let shakespeare = data_dir.join("tinyshakespeare/input.txt");
    let tmp = std::env::temp_dir().join(format!("lora-bench-articles-{}.txt", std::process::id()));
    // (name, target ms, tokens, run)
    type Case<'a> = (
        &'a str,
        Option<f64>,
        Box<dyn FnMut() -> anyhow::Result<usize> + 'a>,
    );
    fn prep<'a>(
        tok: &'a lora_data::Tokenizer,
        dataset: Dataset,
        path: &'a Path,
    ) -> Box<dyn FnMut() -> anyhow::Result<usize> + 'a> {
        Box::new(move || {
            Ok(data::prepare(&DataOptions::new(dataset), path, tok)?
                .inspection
                .tokens)
        })
    }
    let cases: Vec<Case> = vec![
        (
            "alpaca_load_pack_1024",
            Some(1000.0),
            prep(&tok, Dataset::Alpaca, &alpaca),
        ),
        (
            "news_clean_original",
            Some(2000.0),
            Box::new(|| {
                data::clean_news(&articles, &tmp, Cleaning::Original, None)?;
                Ok(0)
            }),
        ),
        (
            "news_blocks_128",
            None,
            prep(&tok, Dataset::News, &articles),
        ),
        (
            "text_blocks_128",
            None,
            prep(&tok, Dataset::Text, &shakespeare),
        ),
    ];
    let (mut rows, mut met) = (vec![], serde_json::Map::new());
    for (name, target, mut run) in cases {
        let tokens = run()?;
        let ms = median_ms(iters, &mut run)?;
        let ok = target.is_none_or(|t| ms < t);
        let tokens_per_s = (tokens > 0).then(|| tokens as f64 / (ms / 1000.0));
        println!(
            "{name:>22}: {ms:9.1} ms  {:>12} tokens/s{}",
            tokens_per_s.map_or("-".into(), |t| format!("{t:.0}")),
            target.map_or(String::new(), |t| format!(
                "  target < {t:.0} ms: {}",
                if ok { "met" } else { "NOT met" }
            ))
        );
        if target.is_some() {
            met.insert(name.into(), ok.into());
        }
        rows.push(Row {
            name: name.into(),
            ms,
            tokens_per_s,
            peak_mib: peak_rss_mib(),
            ..Default::default()
        });
    }
    let _ = std::fs::remove_file(&tmp);
    let report = serde_json::json!({
        "suite": "data",
        "backend": "cpu",
        "machine": machine(),
        "rows": rows,
        "targets_met": met,
    });
    write_report(out, report)
}

/// The `finetune` suite's variants: name and LoRA targets (`None`: full fine-tuning).
const FINETUNE_VARIANTS: [(&str, Option<&str>); 3] = [
    ("lora_c_attn_r8", Some("c_attn")),
    ("lora_attn_mlp_r8", Some("c_attn,c_proj,c_fc")),
    ("full", None),
];

/// Shape of the `finetune` suite.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FinetuneShape {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Layers (GPT-2 small: 12).
    pub n_layer: usize,
    /// Timed steps (after one warm-up step on the CPU, three on a GPU).
    pub steps: usize,
    /// Precision and checkpointing.
    pub compute: Compute,
}

/// One variant in this process: mean ms per optimizer step (forward, backward, clipping, AdamW)
/// over the timed steps, run as `lora-train finetune` runs them.
fn finetune_variant(
    backend: Backend,
    shape: FinetuneShape,
    targets: Option<&str>,
) -> anyhow::Result<Row> {
    let device = shape.compute.device(backend)?;
    device.seed(0);
    let mut cfg = GptConfig::from_model_type("gpt2", 50257, 1024)
        .map_err(anyhow::Error::msg)?
        .with_tie_word_embeddings(true)
        .with_lora_targets(LoraTargets::default());
    cfg.n_layer = shape.n_layer;
    cfg.lora_rank = 0;
    let rows = shape.batch * shape.seq;
    crate::finetune::check_fits(&cfg, rows, shape.compute.precision, backend, &device)?;
    let mut model = cfg.init(&device);
    if let Some(t) = targets {
        let t: LoraTargets = t.parse().map_err(anyhow::Error::msg)?;
        model = lora_core::mark_only_lora_as_trainable(model.add_lora(
            t,
            8,
            16.0,
            0.05,
            Scaling::AlphaOverRank,
        ));
    }
    model = shape.compute.apply(model);
    // Burn's AdamW defaults, its update one kernel a parameter on GPUs.
    let mut optim = lora_core::FusedAdamW {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-5,
        weight_decay: 1e-4,
    }
    .init();
    let ids: Tensor<2, Int> = Tensor::<2>::random(
        [shape.batch, shape.seq],
        Distribution::Uniform(0.0, 50257.0),
        &device,
    )
    .int();
    // GPUs autotune kernels and settle their fused kernels over the first steps (on a fresh H100
    // the first variant's step 2 still autotuned: 623 ms timed vs 398 ms warm); the CPU has no
    // autotuning.
    let warm_up = if backend.is_gpu() { 3 } else { 1 };
    // f16 steps pay the loss scaling that `lora-train finetune` does (the finiteness check and
    // the unscaling).
    let mut scaler = (shape.compute.precision == Precision::F16).then(LossScaler::f16);
    // `n` steps as `lora-train finetune` runs them: each step's loss read after the next step is
    // queued (the last one's at the end), then a device sync.
    let mut steps = |mut model: Gpt, n: usize| -> anyhow::Result<Gpt> {
        let mut reading = None;
        for _ in 0..n {
            let scale = scaler.as_ref().map_or(1.0, LossScaler::scale);
            let batch = vec![(ids.clone(), ids.clone())];
            let (loss, grads) = crate::finetune::accumulate_grads(&model, batch, 1, scale);
            // Clipped to 1.0, as the PEFT side's step is.
            let (stepped, settling) =
                crate::finetune::settle_step(model, loss, grads, scaler.as_mut(), 1.0, |m, g| {
                    optim.step(1e-4, m, g)
                });
            model = stepped;
            if let Some(before) = reading.replace(settling) {
                let loss = Settling::wait(before, scaler.as_mut()).loss;
                anyhow::ensure!(loss.is_finite(), "non-finite loss");
            }
        }
        if let Some(last) = reading {
            let loss = last.wait(scaler.as_mut()).loss;
            anyhow::ensure!(loss.is_finite(), "non-finite loss");
        }
        device.sync().context("device sync")?;
        Ok(model)
    };
    for _ in 0..warm_up {
        model = steps(model, 1)?;
    }
    // Then the steps as they follow each other (a read between them): their fused kernels are
    // grouped differently, and on an H100 the first such window of 20 steps still ran 58-75 ms a
    // step against 54.5 after it.
    if backend.is_gpu() {
        model = steps(model, 4)?;
    }
    // The mean over the timed steps, as the PEFT side times its steps.
    let t0 = Instant::now();
    model = steps(model, shape.steps)?;
    let ms = 1000.0 * t0.elapsed().as_secs_f64() / shape.steps as f64;
    let (peak_mib, in_use_mib) = match backend.is_gpu() {
        true => gpu_memory_peaks(&device, || steps(model, 2).map(drop))?.unzip(),
        false => (peak_rss_mib(), None),
    };
    Ok(Row {
        name: String::new(),
        ms,
        tokens_per_s: Some((shape.batch * shape.seq) as f64 / (ms / 1000.0)),
        peak_mib,
        in_use_mib,
        rounds_ms: None,
    })
}

/// The peaks of a GPU's allocator while `work` runs, after a cleanup (the pages that warm-up
/// and autotuning left are released first): MiB reserved (PyTorch's `max_memory_reserved`) and
/// in use by live tensors (`max_memory_allocated`), sampled every 2 ms from another thread;
/// `None` where the device reports no allocator.
fn gpu_memory_peaks(
    device: &burn::tensor::Device,
    work: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Option<(f64, f64)>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    device.memory_cleanup();
    let Some(first) = device.memory_pool_usage() else {
        return Ok(None);
    };
    let done = AtomicBool::new(false);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let (mut reserved, mut in_use) = (first.bytes_reserved, first.bytes_in_use);
            while !done.load(Ordering::Relaxed) {
                if let Some(u) = device.memory_pool_usage() {
                    reserved = reserved.max(u.bytes_reserved);
                    in_use = in_use.max(u.bytes_in_use);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            (reserved, in_use)
        });
        let result = work();
        done.store(true, Ordering::Relaxed);
        let (reserved, in_use) = sampler.join().expect("memory sampler");
        result.map(|()| Some((mib(reserved), mib(in_use))))
    })
}

/// Whether `python3 -c code` runs and exits 0 (the reference runs' dependencies are there).
fn python_runs(code: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", code])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the PEFT side of the GPU `finetune` suite can run: `python3` has torch with CUDA, peft
/// and transformers (else `false`, said on the terminal); then `script` must exist (an error,
/// before any variant runs).
fn peft_available(script: &Path) -> anyhow::Result<bool> {
    if !python_runs("import torch, peft, transformers; assert torch.cuda.is_available()") {
        println!("PEFT side: skipped (python3 with torch + CUDA, peft and transformers not found)");
        return Ok(false);
    }
    anyhow::ensure!(
        script.is_file(),
        "{}: no such file (--peft PATH, or --no-peft)",
        script.display()
    );
    Ok(true)
}

/// The PEFT side of the GPU `finetune` suite: `script` (`gpu_anchor_peft.py`) run at the same
/// batch and sequence length; its JSON rows and the LoRA c_attn tokens/s in the precision PEFT
/// compares with ours (fp32; bf16 autocast for `--precision f16`).
fn peft_side(script: &Path, shape: FinetuneShape) -> anyhow::Result<(Vec<serde_json::Value>, f64)> {
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(["--steps", "10", "--batch", &shape.batch.to_string()])
        .args(["--seq", &shape.seq.to_string()])
        .output()
        .with_context(|| format!("{}: cannot run python3", script.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("failed")
    );
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let dtype = match shape.compute.precision {
        crate::finetune::Precision::F32 => "fp32",
        crate::finetune::Precision::F16 => "bf16",
    };
    let tps = rows
        .iter()
        .find(|r| r["mode"] == "lora-attn" && r["dtype"] == dtype)
        .and_then(|r| r["tokens_per_s"].as_f64())
        .with_context(|| format!("{}: no lora-attn {dtype} row", script.display()))?;
    Ok((rows, tps))
}

/// Run the `finetune` suite: each variant in a child process (so each peak RSS is its own), or
/// only `only` in this one (the child's side; the row is printed as JSON); on a GPU next to PEFT
/// (`peft`: `peft_available`, `peft_side`).
pub fn finetune(
    backend: Backend,
    shape: FinetuneShape,
    rounds: usize,
    only: Option<&str>,
    peft: Option<&Path>,
    out: &Path,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        shape.batch >= 1 && (2..=1024).contains(&shape.seq) && shape.n_layer >= 1,
        "--batch ≥ 1, --seq in 2..=1024 and --n-layer ≥ 1"
    );
    if let Some(name) = only {
        let (_, targets) = FINETUNE_VARIANTS
            .iter()
            .find(|(n, _)| *n == name)
            .with_context(|| format!("--only {name}: not a variant"))?;
        let row = finetune_variant(backend, shape, *targets)?;
        println!("{}", serde_json::to_string(&row)?);
        return Ok(serde_json::to_value(row)?);
    }
    let mut flags = vec![
        ("--backend", backend.name().to_string()),
        ("--batch", shape.batch.to_string()),
        ("--seq", shape.seq.to_string()),
        ("--n-layer", shape.n_layer.to_string()),
        ("--steps", shape.steps.to_string()),
    ];
    flags.extend(shape.compute.flags());
    let peft = match peft.filter(|_| backend.is_gpu()) {
        Some(script) => peft_available(script)?.then_some(script),
        None => None,
    };
    // What `peak_mib` is: on a GPU the allocator's peaks over two steps after warm-up
    // (`gpu_memory_peaks`); the terminal's label, and the report's.
    let (label, peak_what) = match backend.is_gpu() {
        true => (
            "GPU reserved",
            "GPU memory Burn's allocator reserved (in_use_mib: live tensors), peaks sampled every 2 ms over two steps after warm-up and a cleanup",
        ),
        false => ("peak RSS", "process peak RSS"),
    };
    // Rounds of all the variants, each in a fresh process: the row is a variant's median round.
    let mut runs: Vec<Vec<Row>> = vec![vec![]; FINETUNE_VARIANTS.len()];
    for round in 0..rounds {
        if rounds > 1 {
            println!("round {}/{rounds}:", round + 1);
        }
        for ((name, _), runs) in FINETUNE_VARIANTS.iter().zip(runs.iter_mut()) {
            let row = child_row("finetune", name, &flags)?;
            let in_use = match row.in_use_mib {
                Some(m) => format!(", {m:7.0} MiB in use"),
                None => String::new(),
            };
            println!(
                "{name:>18}: {:9.1} ms/step  {:8.0} tokens/s  {label} {:7.0} MiB{in_use}",
                row.ms,
                row.tokens_per_s.unwrap_or(0.0),
                row.peak_mib.unwrap_or(0.0)
            );
            runs.push(row);
        }
    }
    let rows: Vec<Row> = runs.into_iter().map(median_round).collect();
    if rounds > 1 {
        println!("medians of {rounds} rounds:");
        for row in &rows {
            println!("{:>18}: {:9.1} ms/step", row.name, row.ms);
        }
    }
    let (lora, full) = (&rows[0], &rows[2]);
    let peft = match peft {
        Some(script) => Some(peft_side(script, shape)?),
        None => None,
    };
    let time = lora.ms / full.ms;
    let memory = lora.peak_mib.zip(full.peak_mib).map(|(a, b)| a / b);
    let in_use = lora.in_use_mib.zip(full.in_use_mib).map(|(a, b)| a / b);
    let fmt = |r: Option<f64>| r.map_or("n/a".into(), |m| format!("{m:.3}"));
    println!(
        "LoRA / full: time {time:.3} (target ≤ 0.7), memory ({label}) {} (target ≤ 0.6){}",
        fmt(memory),
        in_use.map_or(String::new(), |r| format!(", in use {r:.3}"))
    );
    let mut report = serde_json::json!({
        "suite": "finetune",
        "backend": backend.name(),
        "machine": machine(),
        "shape": {"model": "gpt2 shapes (random weights)", "rounds": rounds, "batch": shape.batch, "seq": shape.seq, "n_layer": shape.n_layer, "timed_steps": shape.steps, "compute": shape.compute, "lora": "r8, alpha 16, dropout 0.05", "peak_mib": peak_what},
        "rows": rows,
        "ratios": {"lora_over_full_time": time, "lora_over_full_memory": memory, "lora_over_full_memory_in_use": in_use},
    });
    if let Some((peft_rows, peft_tps)) = peft {
        let ratio = lora.tokens_per_s.map(|ours| peft_tps / ours);
        println!(
            "PEFT LoRA c_attn {peft_tps:.0} tokens/s: ours / PEFT time {} (target ≤ 1.0)",
            ratio.map_or("n/a".into(), |r| format!("{r:.3}"))
        );
        report["ratios"]["ours_over_peft_time"] = serde_json::json!(ratio);
        report["peft"] = serde_json::Value::Array(peft_rows);
    }
    write_report(out, report)
}

/// A variant's round with the median time (the upper one of an even count), its `rounds_ms`
/// every round's time in order.
fn median_round(mut runs: Vec<Row>) -> Row {
    let ms: Vec<f64> = runs.iter().map(|r| r.ms).collect();
    runs.sort_by(|a, b| a.ms.total_cmp(&b.ms));
    let mut row = runs.swap_remove(runs.len() / 2);
    if ms.len() > 1 {
        row.rounds_ms = Some(ms);
    }
    row
}

/// Run `cmd` to the end, polling its peak RSS (`VmHWM`); returns stdout, stderr, success, peak MiB.
fn run_measured(
    cmd: &mut std::process::Command,
) -> anyhow::Result<(String, String, bool, Option<f64>)> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().context("stdout")?));
    let err = drain(Box::new(child.stderr.take().context("stderr")?));
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak: Option<f64> = None;
    let status = loop {
        if let Some(mib) = vm_hwm_mib(&status_path) {
            peak = Some(peak.map_or(mib, |p: f64| p.max(mib)));
        }
        if let Some(s) = child.try_wait()? {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    Ok((out, err, status.success(), peak))
}

/// Settings of the `sort` suite.
#[derive(Debug, Clone)]
pub struct SortBench {
    /// Our backends to time.
    pub backends: Vec<Backend>,
    /// Pre-training iterations (length 6).
    pub pretrain_iters: usize,
    /// LoRA fine-tuning iterations (length 10).
    pub finetune_iters: usize,
    /// Threads for both sides (ours: `RAYON_NUM_THREADS`; PyTorch: `--threads`).
    pub threads: usize,
    /// `sort_lora_reference.py`; its `runs/seed0.json` is the fallback without PyTorch.
    pub reference: std::path::PathBuf,
}

/// Run the `sort` suite: the minGPT exercise's pre-train and fine-tune ms/iter and peak RSS, ours
/// (each backend in a child process) next to the PyTorch reference run in the same invocation when
/// `python3 -c 'import torch'` works, else next to its recorded run.
pub fn sort(b: &SortBench, out: &Path) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let tmp = std::env::temp_dir().join(format!("lora-bench-sort-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mut rows = vec![];
    let mut ours = vec![];
    for &backend in &b.backends {
        let report = tmp.join(format!("{}.json", backend.name()));
        let (_, err, ok, peak) = run_measured(
            std::process::Command::new(&exe)
                .args([
                    "sort-demo",
                    "--backend",
                    backend.name(),
                    "--eval-samples",
                    "100",
                ])
                .args(["--pretrain-iters", &b.pretrain_iters.to_string()])
                .args(["--finetune-iters", &b.finetune_iters.to_string()])
                .arg("--report")
                .arg(&report)
                .env("RAYON_NUM_THREADS", b.threads.to_string()),
        )?;
        anyhow::ensure!(ok, "sort-demo on {}: {}", backend.name(), err.trim());
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
        let t = &r["timing"];
        let (p, f) = (
            t["pretrain_ms_per_iter"].as_f64().unwrap_or(f64::NAN),
            t["finetune_ms_per_iter"].as_f64().unwrap_or(f64::NAN),
        );
        ours.push((backend, p, f, peak));
    }
    // The PyTorch side.
    let torch = python_runs("import torch");
    let (source, tp, tf, tpeak) = if torch {
        let json = tmp.join("pytorch.json");
        let (_, err, ok, peak) = run_measured(
            std::process::Command::new("python3")
                .arg(&b.reference)
                .args(["--seed", "0", "--eval-batches", "1", "--no-fixtures"])
                .args(["--pretrain-iters", &b.pretrain_iters.to_string()])
                .args(["--finetune-iters", &b.finetune_iters.to_string()])
                .args(["--threads", &b.threads.to_string()])
                .arg("--json")
                .arg(&json)
                .env("PYTHONHASHSEED", "0"),
        )?;
        anyhow::ensure!(ok, "{}: {}", b.reference.display(), err.trim());
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
        (
            format!(
                "PyTorch {} (same invocation)",
                r["torch"].as_str().unwrap_or("?")
            ),
            r["pretrain"]["ms_per_iter"].as_f64().unwrap_or(f64::NAN),
            r["finetune"]["ms_per_iter"].as_f64().unwrap_or(f64::NAN),
            peak,
        )
    } else {
        let path = b.reference.with_file_name("runs/seed0.json");
        let r: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
        )?;
        (
            format!(
                "PyTorch recorded in {} (1000 / 2000 iterations, threads {})",
                path.display(),
                r["threads"]
            ),
            r["pretrain"]["ms_per_iter"].as_f64().unwrap_or(f64::NAN),
            r["finetune"]["ms_per_iter"].as_f64().unwrap_or(f64::NAN),
            None,
        )
    };
    let _ = std::fs::remove_dir_all(&tmp);
    println!("reference: {source}");
    let mut ratios = serde_json::Map::new();
    for (backend, p, f, peak) in &ours {
        println!(
            "{:>8}: pretrain {p:7.2} ms/iter ({:.2}× PyTorch), finetune {f:7.2} ms/iter ({:.2}×), peak RSS {:.0} MiB",
            backend.name(),
            p / tp,
            f / tf,
            peak.unwrap_or(0.0)
        );
        for (phase, ms) in [("pretrain", p), ("finetune", f)] {
            rows.push(Row {
                name: format!("{}_{phase}", backend.name()),
                ms: *ms,
                tokens_per_s: None,
                peak_mib: *peak,
                ..Default::default()
            });
        }
        let suffix = if *backend == b.backends[0] {
            String::new()
        } else {
            format!("_{}", backend.name())
        };
        ratios.insert(
            format!("ours_over_pytorch_pretrain{suffix}"),
            (p / tp).into(),
        );
        ratios.insert(
            format!("ours_over_pytorch_finetune{suffix}"),
            (f / tf).into(),
        );
    }
    println!(
        " pytorch: pretrain {tp:7.2} ms/iter, finetune {tf:7.2} ms/iter, peak RSS {}",
        tpeak.map_or("n/a".into(), |m| format!("{m:.0} MiB"))
    );
    for (phase, ms) in [("pretrain", tp), ("finetune", tf)] {
        rows.push(Row {
            name: format!("pytorch_{phase}"),
            ms,
            tokens_per_s: None,
            peak_mib: tpeak,
            ..Default::default()
        });
    }
    let report = serde_json::json!({
        "suite": "sort",
        "backend": b.backends.iter().map(|x| x.name()).collect::<Vec<_>>().join(","),
        "machine": machine(),
        "settings": {"pretrain_iters": b.pretrain_iters, "finetune_iters": b.finetune_iters, "threads": b.threads, "reference": source},
        "rows": rows,
        "ratios": ratios,
    });
    write_report(out, report)
}

/// The `lora-layer` suite's variants.
const LAYER_VARIANTS: [&str; 5] = [
    "plain_frozen",
    "factored",
    "factored_dropout",
    "burn_apply_lora",
    "inject",
];

/// One `lora-layer` variant in this process: median ms of forward + backward of `[tokens, 768] →
/// 2304` (rank 8), gradients for the input and the trainable parameters.
fn lora_layer_variant(
    backend: Backend,
    tokens: usize,
    iters: usize,
    reps: usize,
    name: &str,
) -> anyhow::Result<Row> {
    use burn::module::{Lora, ParamGroup};
    use burn::nn::LinearConfig;
    use lora_core::LoraLinear;
    let device = backend.device()?.autodiff();
    device.seed(0);
    let (d_in, d_out, rank) = (768, 2304, 8);
    let base = LinearConfig::new(d_in, d_out).init(&device);
    let x = Tensor::<2>::random([tokens, d_in], Distribution::Normal(0.0, 1.0), &device);
    let forward: Box<dyn Fn(Tensor<2>) -> Tensor<2>> = match name {
        "plain_frozen" => {
            let l = base.no_grad();
            Box::new(move |x| l.forward(x))
        }
        "factored" | "factored_dropout" => {
            let p = if name == "factored" { 0.0 } else { 0.05 };
            let l = LoraLinear::from_linear(base, rank, 16.0, p, Scaling::AlphaOverRank);
            let l = lora_core::mark_only_lora_as_trainable(l);
            Box::new(move |x| l.forward(x))
        }
        "burn_apply_lora" => {
            let l = base.apply_lora(
                Lora::new(rank, 16.0).set_param_group(ParamGroup::from_paths(vec!["weight"])),
            );
            Box::new(move |x| l.forward(x))
        }
        "inject" => {
            // lora-core's no-code route (on Burn's reparameterization, PEFT's init).
            let cfg = lora_core::InjectConfig::new(rank, 16.0).with_targets(&["all-linear"])?;
            let l = lora_core::inject(base, &cfg)?;
            Box::new(move |x| l.forward(x))
        }
        other => anyhow::bail!("--only {other}: not a variant"),
    };
    let mut ms = vec![];
    // A GPU autotunes each new kernel shape over the first passes (on a fresh H100, three warm-up
    // passes left the factored layer's median at 18 ms against 5.5 ms warm).
    let warm_up = if backend.is_gpu() { 20 } else { 3 };
    for i in 0..iters + warm_up {
        let t0 = Instant::now();
        let mut grads_x = None;
        // `reps` passes queued back to back (as in training, where the host records the next
        // layer while the GPU runs this one), one wait at the end.
        for _ in 0..reps {
            let xi = x.clone().require_grad();
            let y = forward(xi.clone());
            let grads = y.mean().backward();
            grads_x = Some(xi.grad(&grads).context("input gradient")?);
        }
        // Read one gradient back, then wait for every queued kernel (the read alone leaves the
        // parameter gradients' kernels running on a GPU) before the clock stops.
        let g = grads_x.expect("reps >= 1");
        let _ = g.slice([0..1, 0..1]).into_data();
        device.sync().context("device sync")?;
        if i >= warm_up {
            ms.push(1000.0 * t0.elapsed().as_secs_f64() / reps as f64);
        }
    }
    let ms = median(ms);
    Ok(Row {
        name: name.into(),
        ms,
        tokens_per_s: Some(tokens as f64 / (ms / 1000.0)),
        peak_mib: peak_rss_mib(),
        ..Default::default()
    })
}

/// Run the `lora-layer` suite: each variant in a child process (its own peak RSS), or only `only`.
pub fn lora_layer(
    backend: Backend,
    tokens: usize,
    iters: usize,
    reps: usize,
    only: Option<&str>,
    out: &Path,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        tokens >= 1 && iters >= 1 && reps >= 1,
        "--tokens, --iters and --reps must be at least 1"
    );
    if let Some(name) = only {
        let row = lora_layer_variant(backend, tokens, iters, reps, name)?;
        println!("{}", serde_json::to_string(&row)?);
        return Ok(serde_json::to_value(row)?);
    }
    // The process with no layer at all: what every variant's peak is measured above.
    let baseline = {
        let device = backend.device()?;
        let _ = Tensor::<2>::zeros([1, 1], &device).into_data();
        peak_rss_mib()
    };
    let flags = [
        ("--backend", backend.name().to_string()),
        ("--tokens", tokens.to_string()),
        ("--iters", iters.to_string()),
        ("--reps", reps.to_string()),
    ];
    let mut rows = vec![];
    for name in LAYER_VARIANTS {
        let mut row = child_row("lora-layer", name, &flags)?;
        row.peak_mib = row.peak_mib.zip(baseline).map(|(p, b)| (p - b).max(0.0));
        println!(
            "{name:>18}: {:8.3} ms  extra peak RSS {:7.1} MiB",
            row.ms,
            row.peak_mib.unwrap_or(0.0)
        );
        rows.push(row);
    }
    let by = |n: &str| rows.iter().find(|r| r.name == n).expect("variant");
    let (plain, ours, burn) = (by("plain_frozen"), by("factored"), by("burn_apply_lora"));
    let inject = by("inject").ms / burn.ms;
    let time = ours.ms / burn.ms;
    let memory = ours
        .peak_mib
        .zip(burn.peak_mib)
        .map(|(a, b)| a / b.max(1e-9));
    let over_plain = ours.ms / plain.ms;
    println!(
        "factored / burn apply_lora: time {time:.3} (target ≤ 0.5), memory {} (≤ 0.5); factored / plain {over_plain:.3} (≤ 1.15); inject / burn apply_lora {inject:.3}",
        memory.map_or("n/a".into(), |m| format!("{m:.3}"))
    );
    let report = serde_json::json!({
        "suite": "lora-layer",
        "backend": backend.name(),
        "machine": machine(),
        "shape": {"tokens": tokens, "d_in": 768, "d_out": 2304, "rank": 8, "reps": reps, "what": "forward + backward (input and trainable grads); ms per pass, reps passes per wait", "peak_mib": "process peak RSS above a process with no layer"},
        "rows": rows,
        "ratios": {"factored_over_burn_native": time, "factored_memory_over_burn_native": memory, "factored_over_plain": over_plain, "inject_over_burn_native": inject},
    });
    write_report(out, report)
}

/// The products of GPT-2 small's linears at `tokens` rows (`[m, k] · [k, n]`): c_attn, attn
/// c_proj, c_fc, mlp c_proj.
pub const LINEAR_SHAPES: [(usize, usize); 4] = [(768, 2304), (768, 768), (768, 3072), (3072, 768)];

/// Run the `matmul` probe: each of GPT-2's linear products (forward `x·W` and the input gradient
/// `dy·Wᵀ`) with the right-hand side row-major (`[k, n]` contiguous), as a transposed view of a
/// contiguous `[n, k]`, and with the reduction split in 2 and 4 parts (one batched product, then
/// a sum): the layouts a linear layer can choose between; and the weight gradient `xᵀ·dy`. Each
/// also through [`lora_core::matmul::matmul`] (`ours_*`: on cubecl its own f32 kernel).
pub fn matmul(
    backend: Backend,
    dtype: burn::tensor::DType,
    tokens: usize,
    iters: usize,
    out: &Path,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        tokens >= 4 && iters >= 1,
        "--tokens must be at least 4 and --iters at least 1"
    );
    let device = backend.device()?;
    anyhow::ensure!(
        device.supports_dtype(dtype),
        "--precision: {dtype:?} is not supported on this device"
    );
    let mut rows = vec![];
    for (d_in, d_out) in LINEAR_SHAPES {
        for (k, n) in [(d_in, d_out), (d_out, d_in)] {
            let lhs = Tensor::<2>::random([tokens, k], Distribution::Normal(0.0, 1.0), &device)
                .cast(dtype);
            let w =
                Tensor::<2>::random([k, n], Distribution::Normal(0.0, 0.02), &device).cast(dtype);
            // `[n, k]` contiguous (a 1-d reshape of the transposed view copies it).
            let wt = w.clone().transpose().reshape([n * k]).reshape([n, k]);
            let dy = Tensor::<2>::random([tokens, n], Distribution::Normal(0.0, 1.0), &device)
                .cast(dtype);
            let variants: Vec<(&str, Product)> = vec![
                ("rhs_row_major", {
                    let (l, w) = (lhs.clone(), w.clone());
                    Box::new(move || l.clone().matmul(w.clone()))
                }),
                ("rhs_transposed_view", {
                    let (l, wt) = (lhs.clone(), wt.clone());
                    Box::new(move || l.clone().matmul(wt.clone().transpose()))
                }),
                ("split_k_2", split_k(&lhs, &w, 2)),
                ("split_k_4", split_k(&lhs, &w, 4)),
                // `xᵀ·dy` (a weight's gradient: `[k, tokens] · [tokens, n]`, the same FLOPs).
                ("lhs_transposed_view", {
                    let (l, dy) = (lhs.clone(), dy.clone());
                    Box::new(move || l.clone().transpose().matmul(dy.clone()))
                }),
                // The same three through `lora_core::matmul` (its own f32 kernel on cubecl).
                ("ours_rhs_row_major", {
                    let (l, w) = (lhs.clone(), w.clone());
                    Box::new(move || lora_core::matmul::matmul(l.clone(), w.clone()))
                }),
                ("ours_rhs_transposed_view", {
                    let (l, wt) = (lhs.clone(), wt.clone());
                    Box::new(move || lora_core::matmul::matmul(l.clone(), wt.clone().transpose()))
                }),
                ("ours_lhs_transposed_view", {
                    let (l, dy) = (lhs.clone(), dy.clone());
                    Box::new(move || lora_core::matmul::matmul(l.clone().transpose(), dy.clone()))
                }),
            ];
            for (name, f) in variants {
                let ms = product_ms(&device, iters, f)?;
                let tflops = 2.0 * (tokens * k * n) as f64 / (ms / 1000.0) / 1e12;
                println!(
                    "[{tokens}, {k}] x [{k}, {n}] {name:>20}: {ms:8.4} ms  {tflops:6.1} TFLOP/s"
                );
                rows.push(serde_json::json!({"m": tokens, "k": k, "n": n, "variant": name, "ms": ms, "tflops": tflops}));
            }
        }
    }
    // Attention's batched products at GPT-2's shapes (8 × 12 heads, a query block of 256 against
    // 1024 keys, head dim 64): q·kᵀ, p·v, and the backward pass's pᵀ·dy.
    let bh = (tokens / 1024).max(1) * 12;
    let normal = |dims: [usize; 3]| {
        Tensor::<3>::random(dims, Distribution::Normal(0.0, 1.0), &device).cast(dtype)
    };
    let (q, kk, p, v) = (
        normal([bh, 256, 64]),
        normal([bh, 1024, 64]),
        normal([bh, 256, 1024]),
        normal([bh, 1024, 64]),
    );
    let dy = normal([bh, 256, 64]);
    let products: [(&str, Tensor<3>, Tensor<3>); 3] = [
        ("q·kᵀ", q, kk.swap_dims(1, 2)),
        ("p·v", p.clone(), v),
        ("pᵀ·dy", p.swap_dims(1, 2), dy),
    ];
    let ours = backend.is_gpu() && dtype == burn::tensor::DType::F32;
    for (what, l, r) in products {
        let ([_, m, k], n) = (l.dims(), r.dims()[2]);
        for (name, f) in [("burn", false), ("ours", true)] {
            if f && !ours {
                continue;
            }
            let (l, r) = (l.clone(), r.clone());
            let prod = move || match f {
                true => lora_core::gemm::product(l.clone(), r.clone()),
                false => l.clone().matmul(r.clone()),
            };
            let ms = product_ms(&device, iters, prod)?;
            let tflops = 2.0 * (bh * m * k * n) as f64 / (ms / 1000.0) / 1e12;
            println!(
                "[{bh}, {m}, {k}] x [{bh}, {k}, {n}] {what:>6} {name:>5}: {ms:8.4} ms  {tflops:6.1} TFLOP/s"
            );
            rows.push(serde_json::json!({"m": m, "k": k, "n": n, "batch": bh, "variant": format!("{what} {name}"), "ms": ms, "tflops": tflops}));
        }
    }
    let report = serde_json::json!({
        "suite": "matmul",
        "backend": backend.name(),
        "dtype": format!("{dtype:?}"),
        "machine": machine(),
        "rows": rows,
    });
    write_report(out, report)
}

/// ms per product of `f`: the median over `iters` batches of 10 products queued, then one
/// read-back and device sync, after one untimed batch (autotune).
fn product_ms<const D: usize>(
    device: &Device,
    iters: usize,
    f: impl Fn() -> Tensor<D>,
) -> anyhow::Result<f64> {
    const REPS: usize = 10;
    let batch = || -> anyhow::Result<()> {
        let mut last = f();
        for _ in 1..REPS {
            last = f();
        }
        let _ = last
            .slice(std::array::from_fn::<_, D, _>(|_| 0..1))
            .into_data();
        device.sync().context("device sync")
    };
    batch()?;
    Ok(median_ms(iters, batch)? / REPS as f64)
}

/// One way of computing a product, called once per timed product.
type Product = Box<dyn Fn() -> Tensor<2>>;

/// `lhs · w` as `parts` products over slices of the reduction, one batched matmul, then a sum.
fn split_k(lhs: &Tensor<2>, w: &Tensor<2>, parts: usize) -> Product {
    let ([m, k], n) = (lhs.dims(), w.dims()[1]);
    let kp = k / parts;
    let l = lhs.clone().reshape([m, parts, kp]).swap_dims(0, 1);
    let w = w.clone().reshape([parts, kp, n]);
    Box::new(move || l.clone().matmul(w.clone()).sum_dim(0).reshape([m, n]))
}
