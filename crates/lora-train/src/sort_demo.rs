//! The minGPT LoRA exercise: pre-train gpt-nano to sort length-6 digit sequences, show it fails on
//! length 10, recover with LoRA (`../shared/reference/sort_results.md` is the PyTorch reference).

use crate::Backend;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use lora_core::{
    ParamReport, Scaling, clip_grad_norm, mark_only_lora_as_trainable, param_report,
    utils::freeze_lora,
};
use lora_data::{SortDataset, Split};
use lora_gpt::mingpt::ids_tensor;
use lora_gpt::optim::{OptimConfig, configure_optimizer};
use lora_gpt::{Gpt, GptConfig, LoraTargets};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use std::time::Instant;

/// Settings of one run (the exercise's defaults).
#[derive(Debug, Clone)]
pub struct SortDemoConfig {
    /// Compute backend.
    pub backend: Backend,
    /// Seed of the weights, data and dropout.
    pub seed: u64,
    /// Pre-training iterations on length 6.
    pub pretrain_iters: usize,
    /// LoRA fine-tuning iterations on length 10.
    pub finetune_iters: usize,
    /// Sequences per split and evaluation (minGPT: 50 batches of 100).
    pub eval_samples: usize,
    /// Layers with adapters during fine-tuning (attn always, as in the exercise).
    pub lora_targets: LoraTargets,
    /// Batch size.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Model block size (24 in the exercise).
    pub block_size: usize,
    /// Print progress every this many iterations.
    pub log_every: usize,
}

impl Default for SortDemoConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Flex,
            seed: 0,
            pretrain_iters: 1000,
            finetune_iters: 2000,
            eval_samples: 5000,
            lora_targets: LoraTargets::ATTN,
            batch_size: 64,
            lr: 5e-4,
            rank: 8,
            alpha: 32.0,
            block_size: 24,
            log_every: 100,
        }
    }
}

/// Fraction of fully sorted sequences per split.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SplitAccuracy {
    /// Train split.
    pub train: f64,
    /// Test split.
    pub test: f64,
}

/// Parameter counts of the run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Params {
    /// All parameters.
    pub total: usize,
    /// Trainable while pre-training (LoRA frozen).
    pub trainable_pretrain: usize,
    /// Trainable while fine-tuning (LoRA only).
    pub trainable_lora: usize,
}

/// Accuracies at the three checkpoints.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Accuracy {
    /// After pre-training, length 6.
    pub pretrain_len6: SplitAccuracy,
    /// After pre-training, length 10.
    pub before_lora_len10: SplitAccuracy,
    /// After LoRA fine-tuning, length 10.
    pub after_lora_len10: SplitAccuracy,
}

/// Wall-clock figures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    /// Pre-training ms per iteration.
    pub pretrain_ms_per_iter: f64,
    /// Fine-tuning ms per iteration.
    pub finetune_ms_per_iter: f64,
    /// Whole run, seconds.
    pub total_s: f64,
}

/// The JSON report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct SortDemoReport {
    /// Seed.
    pub seed: u64,
    /// Backend name.
    pub backend: String,
    /// LoRA targets during fine-tuning.
    pub lora_targets: String,
    /// Parameter counts.
    pub params: Params,
    /// Accuracies.
    pub accuracy: Accuracy,
    /// Timing.
    pub timing: Timing,
    /// Loss of the first and last logged iteration, per phase.
    pub loss: LossSummary,
}

/// First and last loss of each phase.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LossSummary {
    /// Pre-training `[first, last]`.
    pub pretrain: [f32; 2],
    /// Fine-tuning `[first, last]`.
    pub finetune: [f32; 2],
}

struct Phase<'a> {
    tag: &'a str,
    dataset: SortDataset,
    iters: usize,
}

/// minGPT's Trainer loop: forward, backward, clip the global grad norm to 1, AdamW step.
/// Returns the model, ms/iter and the first / last loss.
fn train(
    mut model: Gpt,
    optim: &mut ModuleOptimizer,
    phase: Phase,
    cfg: &SortDemoConfig,
    rng: &mut StdRng,
    device: &Device,
) -> (Gpt, f64, [f32; 2]) {
    let t = phase.dataset.block_size();
    let start = Instant::now();
    let mut losses = [f32::NAN; 2];
    for it in 0..phase.iters {
        let (x, y) = phase.dataset.batch(cfg.batch_size, rng);
        let x = ids_tensor(x, [cfg.batch_size, t], device);
        let y = ids_tensor(y, [cfg.batch_size, t], device);
        let (_, loss) = model.forward_loss(x, y);
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        clip_grad_norm(&model, &mut grads, 1.0);
        model = optim.step(cfg.lr, model, grads);
        let last = it + 1 == phase.iters;
        if it == 0 || last || (cfg.log_every > 0 && it % cfg.log_every == 0) {
            let value = loss.into_scalar::<f32>();
            if it == 0 {
                losses[0] = value;
            }
            if last {
                losses[1] = value;
            }
            let secs = start.elapsed().as_secs_f64();
            let rate = (it + 1) as f64 / secs.max(1e-9);
            let eta = (phase.iters - it - 1) as f64 / rate;
            println!(
                "[{}] iter {it:>5}/{}: loss {value:.5}  {rate:.1} it/s  eta {eta:.0}s",
                phase.tag, phase.iters
            );
        }
    }
    let ms = 1000.0 * start.elapsed().as_secs_f64() / phase.iters.max(1) as f64;
    (model, ms, losses)
}

/// minGPT demo's `eval_split`: greedy-decode `length` tokens for `samples` fresh sequences of the
/// split (batches of 100) with the merged inference model; fraction fully sorted.
pub fn eval_split(
    model: &Gpt,
    dataset: &SortDataset,
    samples: usize,
    rng: &mut StdRng,
    device: &Device,
) -> f64 {
    let n = dataset.length;
    let (mut correct, mut total) = (0usize, 0usize);
    while total < samples {
        let b = 100.min(samples - total);
        let seqs: Vec<Vec<u8>> = (0..b).map(|_| dataset.sample_sequence(rng)).collect();
        let inp = seqs.iter().flatten().map(|&d| d as i64).collect();
        let out = model.generate(ids_tensor(inp, [b, n], device), n, 1.0, false, None);
        let out: Vec<i64> = out.narrow(1, n, n).into_data().iter::<i64>().collect();
        for (seq, cand) in seqs.iter().zip(out.chunks(n)) {
            let mut sorted = seq.clone();
            sorted.sort_unstable();
            correct += sorted.iter().zip(cand).all(|(&s, &c)| s as i64 == c) as usize;
        }
        total += b;
    }
    correct as f64 / total as f64
}

fn eval_both(
    model: &Gpt,
    length: usize,
    cfg: &SortDemoConfig,
    rng: &mut StdRng,
    device: &Device,
    tag: &str,
) -> SplitAccuracy {
    let inference = model.eval();
    let plain = device.clone().without_autodiff();
    let mut acc = |split| {
        eval_split(
            &inference,
            &SortDataset::new(split, length, 3),
            cfg.eval_samples,
            rng,
            &plain,
        )
    };
    let r = SplitAccuracy {
        train: acc(Split::Train),
        test: acc(Split::Test),
    };
    println!(
        "[{tag}] length {length}: train {:.2}%  test {:.2}%",
        100.0 * r.train,
        100.0 * r.test
    );
    r
}

/// Run the whole exercise for one seed.
pub fn run(cfg: &SortDemoConfig) -> anyhow::Result<SortDemoReport> {
    let start = Instant::now();
    let device = cfg.backend.device()?.autodiff();
    device.seed(cfg.seed);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let len6 = SortDataset::new(Split::Train, 6, 3);
    let len10 = SortDataset::new(Split::Train, 10, 3);
    anyhow::ensure!(
        cfg.block_size >= len10.block_size(),
        "--block-size {} is too small: length 10 needs {}",
        cfg.block_size,
        len10.block_size()
    );

    // 1. Pre-train on length 6: the attention adapters exist but are frozen (B stays 0).
    let config = GptConfig::from_model_type("gpt-nano", 3, cfg.block_size)
        .map_err(anyhow::Error::msg)?
        .with_lora_rank(cfg.rank)
        .with_lora_alpha(cfg.alpha)
        .with_lora_targets(LoraTargets::ATTN);
    let model = freeze_lora(config.init(&device));
    let pre: ParamReport = param_report(&model);
    println!("pre-training: {pre}");
    let mut optim = configure_optimizer(&model, cfg.rank, OptimConfig::default());
    let phase = Phase {
        tag: "pretrain",
        dataset: len6.clone(),
        iters: cfg.pretrain_iters,
    };
    let (model, pretrain_ms, pretrain_loss) =
        train(model, &mut optim, phase, cfg, &mut rng, &device);

    // 2. Evaluate on length 6 and on length 10.
    let pretrain_len6 = eval_both(&model, 6, cfg, &mut rng, &device, "pretrained");
    let before_lora_len10 = eval_both(&model, 10, cfg, &mut rng, &device, "before LoRA");

    // 3. Train only the LoRA factors on length 10.
    let t = cfg.lora_targets;
    let model = model.add_lora(t, cfg.rank, cfg.alpha, 0.0, Scaling::AlphaOverRank);
    let model = mark_only_lora_as_trainable(model);
    let lora: ParamReport = param_report(&model);
    println!("LoRA fine-tuning ({t}): {lora}");
    let mut optim = configure_optimizer(&model, cfg.rank, OptimConfig::default());
    let phase = Phase {
        tag: "lora",
        dataset: len10,
        iters: cfg.finetune_iters,
    };
    let (model, finetune_ms, finetune_loss) =
        train(model, &mut optim, phase, cfg, &mut rng, &device);
    let after_lora_len10 = eval_both(&model, 10, cfg, &mut rng, &device, "after LoRA");

    Ok(SortDemoReport {
        seed: cfg.seed,
        backend: cfg.backend.name().into(),
        lora_targets: t.to_string(),
        params: Params {
            total: pre.total,
            trainable_pretrain: pre.trainable,
            trainable_lora: lora.trainable,
        },
        accuracy: Accuracy {
            pretrain_len6,
            before_lora_len10,
            after_lora_len10,
        },
        timing: Timing {
            pretrain_ms_per_iter: pretrain_ms,
            finetune_ms_per_iter: finetune_ms,
            total_s: start.elapsed().as_secs_f64(),
        },
        loss: LossSummary {
            pretrain: pretrain_loss,
            finetune: finetune_loss,
        },
    })
}

/// The reference-style table over several runs, with the mean.
pub fn table(reports: &[SortDemoReport]) -> String {
    let pct = |a: SplitAccuracy| format!("{:6.2} / {:6.2}", 100.0 * a.train, 100.0 * a.test);
    let mut s = String::from(
        "| seed | pre-train, len 6 | len 10, before LoRA | len 10, after LoRA | pretrain ms/iter | finetune ms/iter |\n|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let a = r.accuracy;
        s += &format!(
            "| {} | {} | {} | {} | {:.2} | {:.2} |\n",
            r.seed,
            pct(a.pretrain_len6),
            pct(a.before_lora_len10),
            pct(a.after_lora_len10),
            r.timing.pretrain_ms_per_iter,
            r.timing.finetune_ms_per_iter
        );
    }
    if reports.len() > 1 {
        let n = reports.len() as f64;
        let mean = |f: &dyn Fn(&SortDemoReport) -> SplitAccuracy| SplitAccuracy {
            train: reports.iter().map(|r| f(r).train).sum::<f64>() / n,
            test: reports.iter().map(|r| f(r).test).sum::<f64>() / n,
        };
        s += &format!(
            "| mean | {} | {} | {} | {:.2} | {:.2} |\n",
            pct(mean(&|r| r.accuracy.pretrain_len6)),
            pct(mean(&|r| r.accuracy.before_lora_len10)),
            pct(mean(&|r| r.accuracy.after_lora_len10)),
            reports
                .iter()
                .map(|r| r.timing.pretrain_ms_per_iter)
                .sum::<f64>()
                / n,
            reports
                .iter()
                .map(|r| r.timing.finetune_ms_per_iter)
                .sum::<f64>()
                / n,
        );
    }
    s
}
