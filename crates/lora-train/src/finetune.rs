//! `lora-train finetune`: causal-LM fine-tuning of GPT-2 with LoRA (or every weight with `--full`),
//! with PEFT-format adapters, metrics, checkpoints and bit-identical resume.
//!
//! The loop is written out here rather than on burn-train's `Learner`: resuming bit for bit needs
//! the data position and the dropout RNG in the checkpoint, and the outputs are Hugging Face /
//! PEFT folders rather than Burn records. Burn's optimizer state (`ModuleOptimizer::to_record`)
//! and gradient accumulation are used as they are.

use crate::Backend;
use crate::data::{self, DataOptions};
use crate::fsutil::{remove_stale_temps, write_atomic, write_dir_atomic, write_json_atomic};
use anyhow::{Context, bail, ensure};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use lora_core::utils::{ValuesByPath, fnv1a};
use lora_core::{
    FusedAdamW, LossScaler, ParamReport, Scaling, SettleRead, StartedRead, Unscaled,
    clip_grad_norm, load_params_by_path, mark_only_lora_as_trainable, param_report, params_by_path,
    path_param_ids,
};
use lora_data::{TokenSequences, Tokenizer};
use lora_gpt::export::{self, AdapterSpec};
use lora_gpt::gpt2::Gpt2Folder;
use lora_gpt::mingpt::ids_tensor;
use lora_gpt::{Gpt, GptConfig, LoraTargets};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Learning-rate schedule after the warm-up (Hugging Face's `get_*_schedule_with_warmup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half a cosine from `lr` down to 0 at the last step.
    Cosine,
    /// `lr` throughout.
    Constant,
}

/// Compute precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Blocks and head in f16, trained weights, gradients and optimizer state in f32, frozen
    /// linear weights kept in f16 (norms and the loss in f32): mixed precision as
    /// `torch.autocast(dtype=float16)` does it.
    F16,
}

/// How a training step computes (`finetune` and `bench finetune`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::Args, Serialize, Deserialize)]
pub struct Compute {
    /// Compute precision: f16 runs the blocks and head in half precision with f32 master weights.
    #[arg(long, value_enum, default_value = "f32")]
    #[serde(default)]
    pub precision: Precision,
    /// Recompute memory-bound activations in the backward pass (Burn's balanced checkpointing)
    /// instead of keeping them.
    #[arg(long)]
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Keep dropout masks for the backward pass as floats (16× their memory as bits, the default;
    /// on GPUs dropout draws no mask: it is hashed from each element's position, either way).
    #[arg(long)]
    #[serde(default)]
    pub dense_dropout_masks: bool,
}

impl Compute {
    /// `backend`'s autodiff device, with gradient checkpointing if asked; an error where f16 is
    /// asked of a device without it (Mesa's llvmpipe: its shaders would fail to compile mid-step).
    pub fn device(self, backend: Backend) -> anyhow::Result<Device> {
        let device = backend.device()?.autodiff();
        ensure!(
            self.precision == Precision::F32 || device.supports_dtype(burn::tensor::DType::F16),
            "--precision f16: this machine's --backend {} device has no f16 (Mesa's llvmpipe has none); use --precision f32",
            backend.name()
        );
        Ok(if self.gradient_checkpointing {
            device.gradient_checkpointing()
        } else {
            device
        })
    }

    /// `model` computing in this precision; dropout masks kept as asked (process-wide,
    /// [`lora_core::dropout::set_packed_masks`]).
    pub fn apply(self, model: Gpt) -> Gpt {
        lora_core::dropout::set_packed_masks(!self.dense_dropout_masks);
        match self.precision {
            Precision::F32 => model,
            Precision::F16 => model.half_precision(),
        }
    }

    /// The command-line flags that give these settings (the defaults give none).
    pub fn flags(self) -> Vec<(&'static str, String)> {
        let mut flags = vec![];
        if self.precision == Precision::F16 {
            flags.push(("--precision", "f16".to_string()));
        }
        if self.gradient_checkpointing {
            flags.push(("--gradient-checkpointing", String::new()));
        }
        if self.dense_dropout_masks {
            flags.push(("--dense-dropout-masks", String::new()));
        }
        flags
    }
}

/// Everything a run is made of (written to `run.json`; a resume must match it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetuneConfig {
    /// Hugging Face GPT-2 folder (weights, config.json, tokenizer.json).
    pub model: Option<PathBuf>,
    /// Random-weight model by name (`gpt2`, `gpt-nano`, …) when no folder is given.
    pub model_type: Option<String>,
    /// Override the model type's layer count.
    pub n_layer: Option<usize>,
    /// `tokenizer.json` (default: the model folder's).
    pub tokenizer: Option<PathBuf>,
    /// Data file.
    pub data: PathBuf,
    /// How the data becomes sequences.
    pub data_options: DataOptions,
    /// Share of the sequences held out for validation.
    pub val_fraction: f64,
    /// Output folder.
    pub out: PathBuf,
    /// Train every weight instead of adapters.
    pub full: bool,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA alpha.
    pub lora_alpha: f64,
    /// Dropout on the adapter input.
    pub lora_dropout: f64,
    /// Adapted layers.
    pub lora_targets: String,
    /// Scaling convention (`alpha-over-rank`, `alpha`, `rslora`).
    pub scaling: String,
    /// Optimizer steps (overrides `epochs`).
    pub max_iters: Option<usize>,
    /// Passes over the training sequences.
    pub epochs: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Schedule after the warm-up.
    pub schedule: Schedule,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub clip: f64,
    /// Validation every N steps (0: only at the end).
    pub eval_every: usize,
    /// Validation batches per evaluation (0: all).
    pub eval_batches: usize,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: usize,
    /// Log every N steps.
    pub log_every: usize,
    /// Seed of the model init, data order and dropout.
    pub seed: u64,
    /// Precision and checkpointing (`precision`, `gradient_checkpointing` in `run.json`).
    #[serde(flatten)]
    pub compute: Compute,
}

impl FinetuneConfig {
    /// The settings a resumed run must share with the checkpoint: all but logging, evaluation
    /// and checkpoint cadence.
    fn resume_key(&self) -> Self {
        Self {
            eval_every: 0,
            eval_batches: 0,
            save_every: 0,
            log_every: 0,
            ..self.clone()
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metric {
    /// Optimizer step (1-based, after the update).
    pub step: usize,
    /// `train` or `val`.
    pub split: String,
    /// Mean loss.
    pub loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Tokens per second since the last train log.
    pub tokens_per_s: Option<f64>,
}

/// What `checkpoint/state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    config: FinetuneConfig,
    /// Training-loss sum and count since the last log line (so logs resume identically).
    loss_acc: f64,
    loss_n: usize,
    /// FNV-1a of `params.safetensors` and `optimizer.bpk`.
    checksums: (u64, u64),
}

/// Figures of a finished run (`run.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The configuration.
    pub config: FinetuneConfig,
    /// Compute backend.
    pub backend: String,
    /// Parameter counts.
    pub params: ParamReport,
    /// Optimizer state size (bytes of its serialized record).
    pub optimizer_state_bytes: usize,
    /// Training / validation sequences.
    pub sequences: (usize, usize),
    /// Optimizer steps done.
    pub steps: usize,
    /// Step the run resumed from (0: fresh).
    pub resumed_from: usize,
    /// Last logged training loss.
    pub final_train_loss: Option<f64>,
    /// Validation loss before training and at the end.
    pub val_loss: (Option<f64>, Option<f64>),
    /// Wall time of this process, seconds.
    pub wall_s: f64,
    /// Training tokens per second of this process.
    pub tokens_per_s: f64,
    /// Peak resident memory, MiB.
    pub peak_rss_mib: Option<f64>,
}

/// Hugging Face's warm-up + schedule factor times `lr` at 0-based optimizer step `step`.
pub fn lr_at(cfg: &FinetuneConfig, step: usize, total: usize) -> f64 {
    if step < cfg.warmup {
        return cfg.lr * step as f64 / cfg.warmup.max(1) as f64;
    }
    match cfg.schedule {
        Schedule::Constant => cfg.lr,
        Schedule::Cosine => {
            let progress = (step - cfg.warmup) as f64 / (total - cfg.warmup).max(1) as f64;
            cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
        }
    }
}

/// The parsed scaling convention.
pub fn parse_scaling(s: &str) -> anyhow::Result<Scaling> {
    Ok(match s {
        "alpha-over-rank" => Scaling::AlphaOverRank,
        "alpha" => Scaling::Alpha,
        "rslora" => Scaling::RsLora,
        other => bail!("--scaling '{other}': expected alpha-over-rank, alpha or rslora"),
    })
}

/// A seed for `(seed, stream, index)`: SplitMix64 of the three.
fn mix(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(index.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Training order: epoch `e` is the train indices shuffled with `mix(seed, 1, e)`.
struct Order {
    train: Vec<usize>,
    seed: u64,
    epoch: Option<(usize, Vec<usize>)>,
}

impl Order {
    /// The sequence at global position `p` (over concatenated epochs).
    fn at(&mut self, p: usize) -> usize {
        let (e, i) = (p / self.train.len(), p % self.train.len());
        if self.epoch.as_ref().is_none_or(|(k, _)| *k != e) {
            let mut perm = self.train.clone();
            perm.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix(
                self.seed, 1, e as u64,
            )));
            self.epoch = Some((e, perm));
        }
        self.epoch.as_ref().map(|(_, v)| v[i]).unwrap_or(0)
    }
}

/// `[batch, seq]` input and target tensors of the sequences `idx`.
fn batch(
    seqs: &TokenSequences,
    idx: &[usize],
    device: &Device,
) -> (
    burn::tensor::Tensor<2, burn::tensor::Int>,
    burn::tensor::Tensor<2, burn::tensor::Int>,
    usize,
) {
    let t = seqs.seq_len();
    let (mut x, mut y) = (
        Vec::with_capacity(idx.len() * t),
        Vec::with_capacity(idx.len() * t),
    );
    for &i in idx {
        let s = seqs.get(i);
        x.extend(s.input.iter().map(|&v| v as i64));
        y.extend(s.targets);
    }
    let counted = y.iter().filter(|&&v| v >= 0).count();
    (
        ids_tensor(x, [idx.len(), t], device),
        ids_tensor(y, [idx.len(), t], device),
        counted,
    )
}

/// Gradients of the mean loss over `micro` micro-batches (inputs, targets) times `scale` (a
/// [`LossScaler`]'s, else 1), accumulated as one step of `n` micro-batches; returns the loss
/// (mean over the micro-batches, unscaled) as a `[1]` tensor, not read back, and the gradients.
pub fn accumulate_grads(
    model: &Gpt,
    micro: Vec<(IdsTensor, IdsTensor)>,
    n: usize,
    scale: f64,
) -> (Tensor<1>, GradientsParams) {
    let mut accum = GradientsAccumulator::<Gpt>::new();
    let mut total: Option<Tensor<1>> = None;
    for (x, y) in micro {
        let scaled = model.scaled_loss(x, y, scale / n as f64);
        let loss = scaled.clone().inner().reshape([1]);
        let loss = match scale == 1.0 {
            true => loss,
            false => loss.div_scalar(scale),
        };
        let grads = GradientsParams::from_grads(scaled.backward(), model);
        total = Some(match total {
            Some(t) => t + loss,
            None => loss,
        });
        accum.accumulate(model, grads);
    }
    let total = total.expect("accumulate_grads: at least one micro-batch");
    (total, accum.grads())
}

/// A step's loss on its way back ([`settle_step`]); [`Settling::wait`] gives it.
pub enum Settling {
    /// Read already (the step's flag had to be read before it was taken).
    Done(Unscaled),
    /// Without a loss scaler.
    Plain(StartedRead),
    /// With the scaler that started it.
    Scaled(SettleRead),
}

impl Settling {
    /// The step's loss (and, with `scaler`, the scaler updated from its flag), waiting for it.
    pub fn wait(self, scaler: Option<&mut LossScaler>) -> Unscaled {
        match (self, scaler) {
            (Settling::Done(u), _) => u,
            (Settling::Plain(read), _) => Unscaled {
                loss: read.wait()[0] as f64,
                take: true,
                late_overflow: None,
            },
            (Settling::Scaled(read), Some(s)) => s.settle_finish(read),
            (Settling::Scaled(_), None) => panic!("Settling::wait: a scaled step needs its scaler"),
        }
    }
}

/// The optimizer step `take` on `grads` (of `loss` times the scaler's scale), the loss's read
/// started: the gradients' total norm clipped to `clip` (0: not clipped) and, with a
/// [`LossScaler`], unscaled in the same pass on the device ([`LossScaler::unscale`]). The step
/// is queued before the loss is read, and the read is only started ([`Settling`]): wait for it
/// after queueing the next step, and the device runs from one step into the next without waiting
/// for the host. At a scale no step has passed yet the overflow flag is read first, and an
/// overflowed step skipped (`take` false).
pub fn settle_step(
    model: Gpt,
    loss: Tensor<1>,
    mut grads: GradientsParams,
    scaler: Option<&mut LossScaler>,
    clip: f64,
    take: impl FnOnce(Gpt, GradientsParams) -> Gpt,
) -> (Gpt, Settling) {
    let max_norm = (clip > 0.0).then_some(clip);
    match scaler {
        Some(s) => {
            if s.unscale(&model, &mut grads, max_norm) {
                let model = take(model, grads);
                return (model, Settling::Scaled(s.settle_start(loss)));
            }
            let settled = s.settle(loss);
            match settled.take {
                true => (take(model, grads), Settling::Done(settled)),
                false => (model, Settling::Done(settled)),
            }
        }
        None => {
            if let Some(max_norm) = max_norm {
                clip_grad_norm(&model, &mut grads, max_norm);
            }
            let model = take(model, grads);
            (model, Settling::Plain(StartedRead::start(loss)))
        }
    }
}

/// `[batch, seq]` token ids.
pub type IdsTensor = burn::tensor::Tensor<2, burn::tensor::Int>;

/// Mean validation loss over `idx` (no autodiff, dropout off), weighted by counted targets.
fn evaluate(
    model: &Gpt,
    seqs: &TokenSequences,
    idx: &[usize],
    batch_size: usize,
    max_batches: usize,
) -> Option<f64> {
    let model = model.valid();
    let device = model.ln_f.gamma.lazy_device();
    let (mut sum, mut n) = (0.0, 0usize);
    let limit = if max_batches == 0 {
        usize::MAX
    } else {
        max_batches
    };
    for chunk in idx.chunks(batch_size).take(limit) {
        let (x, y, counted) = batch(seqs, chunk, &device);
        if counted == 0 {
            continue;
        }
        let loss = model.loss(x, y);
        sum += loss.into_scalar::<f32>() as f64 * counted as f64;
        n += counted;
    }
    (n > 0).then(|| sum / n as f64)
}

/// The model (base weights; adapters are added by the caller), its config and the tokenizer.
/// The flags are checked against the model's config ([`validate`], [`check_fits`]) before its
/// weights are read or made.
fn base_model(
    cfg: &FinetuneConfig,
    backend: Backend,
    device: &Device,
) -> anyhow::Result<(Gpt, GptConfig, Tokenizer)> {
    let check = |gcfg: &GptConfig| {
        validate(cfg, gcfg)?;
        let rows = cfg.batch_size * cfg.data_options.seq_len();
        check_fits(gcfg, rows, cfg.compute.precision, backend, device)
    };
    match (&cfg.model, &cfg.model_type) {
        (Some(dir), _) => {
            let folder = Gpt2Folder::open(dir)?;
            let tok_path = cfg
                .tokenizer
                .clone()
                .unwrap_or_else(|| dir.join("tokenizer.json"));
            let tok = Tokenizer::from_file(&tok_path)?;
            let gcfg = folder.config.gpt_config();
            crate::lm::check_vocab(&tok, &tok_path, gcfg.vocab_size)?;
            check(&gcfg)?;
            Ok((folder.load(|c| c, device)?, gcfg, tok))
        }
        (None, Some(name)) => {
            let tok_path = cfg.tokenizer.as_ref().context(
                "--model-type needs --tokenizer FILE (a tokenizer.json) to read the data",
            )?;
            let tok = Tokenizer::from_file(tok_path)?;
            let mut gcfg = GptConfig::from_model_type(name, tok.vocab_size(), 1024)
                .map_err(|e| anyhow::anyhow!("--model-type: {e}"))?
                .with_tie_word_embeddings(true);
            if let Some(n) = cfg.n_layer {
                ensure!(n >= 1, "--n-layer must be at least 1");
                gcfg.n_layer = n;
            }
            gcfg.lora_targets = LoraTargets::default();
            gcfg.lora_rank = 0;
            check(&gcfg)?;
            device.seed(mix(cfg.seed, 0, 0));
            Ok((gcfg.init(device), gcfg, tok))
        }
        (None, None) => {
            bail!("give --model DIR (a Hugging Face GPT-2 folder) or --model-type NAME")
        }
    }
}

/// Check the flags against the model before any work.
fn validate(cfg: &FinetuneConfig, gcfg: &GptConfig) -> anyhow::Result<()> {
    let flag = if cfg.data_options.dataset == data::Dataset::Alpaca {
        "--max-seq-len"
    } else {
        "--block-size"
    };
    let seq_len = cfg.data_options.seq_len();
    ensure!(
        seq_len <= gcfg.block_size,
        "{flag} {seq_len} is larger than the model's n_positions {}",
        gcfg.block_size
    );
    ensure!(cfg.batch_size >= 1, "--batch-size must be at least 1");
    ensure!(cfg.grad_accum >= 1, "--grad-accum must be at least 1");
    ensure!(cfg.lr.is_finite() && cfg.lr > 0.0, "--lr must be positive");
    ensure!(
        (0.0..1.0).contains(&cfg.val_fraction),
        "--val-fraction must be in [0, 1)"
    );
    ensure!(
        cfg.clip.is_finite() && cfg.clip >= 0.0,
        "--clip must be 0 (off) or positive"
    );
    if !cfg.full {
        ensure!(
            cfg.lora_rank >= 1,
            "--lora-rank must be at least 1 (use --full to train every weight)"
        );
        ensure!(
            cfg.lora_rank <= gcfg.n_embd,
            "--lora-rank {} is larger than min(in, out) = {} of the adapted layers",
            cfg.lora_rank,
            gcfg.n_embd
        );
        ensure!(
            cfg.lora_alpha.is_finite() && cfg.lora_alpha > 0.0,
            "--lora-alpha must be positive"
        );
        ensure!(
            (0.0..1.0).contains(&cfg.lora_dropout),
            "--lora-dropout must be in [0, 1)"
        );
    }
    Ok(())
}

/// A checkpoint's parameters (path → shape, values) from the bytes of `path`.
fn params_from_bytes(bytes: &[u8], path: &Path) -> anyhow::Result<ValuesByPath> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{}: corrupt checkpoint: {e}", path.display()))?;
    let mut out = ValuesByPath::new();
    for (name, view) in st.tensors() {
        ensure!(
            view.dtype() == safetensors::Dtype::F32,
            "{}: tensor '{name}' is not f32",
            path.display()
        );
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

fn adapter_spec(cfg: &FinetuneConfig, targets: LoraTargets, scaling: Scaling) -> AdapterSpec {
    AdapterSpec {
        r: cfg.lora_rank,
        alpha: cfg.lora_alpha,
        scaling,
        dropout: cfg.lora_dropout,
        target_modules: targets.module_names(),
        base_model: cfg
            .model
            .as_ref()
            .map(|p| p.display().to_string())
            .or_else(|| cfg.model_type.clone()),
    }
}

/// Write the trained result: `OUT/adapter/` (PEFT) or, with `--full`, `OUT/model/` (HF folder).
fn write_result(
    cfg: &FinetuneConfig,
    gcfg: &GptConfig,
    model: &Gpt,
    targets: LoraTargets,
    scaling: Scaling,
) -> anyhow::Result<PathBuf> {
    let model = model.valid();
    if cfg.full {
        let dir = cfg.out.join("model");
        let base = cfg
            .model
            .as_ref()
            .and_then(|d| std::fs::read(d.join("config.json")).ok())
            .and_then(|b| serde_json::from_slice(&b).ok());
        crate::merge::write_hf_folder(&dir, &model, gcfg, base, tokenizer_files(cfg), &cfg.out)?;
        Ok(dir)
    } else {
        let dir = cfg.out.join("adapter");
        let spec = adapter_spec(cfg, targets, scaling);
        let files = vec![
            (
                "adapter_config.json".to_string(),
                serde_json::to_vec_pretty(&export::peft_adapter_config(&spec))?,
            ),
            (
                "adapter_model.safetensors".to_string(),
                export::safetensors_bytes(&export::peft_adapter_tensors(&model))?,
            ),
        ];
        write_dir_atomic(&dir, &files)?;
        Ok(dir)
    }
}

/// Tokenizer files of the model folder (or `--tokenizer`), to copy next to written weights.
fn tokenizer_files(cfg: &FinetuneConfig) -> Vec<(String, Vec<u8>)> {
    match (&cfg.model, &cfg.tokenizer) {
        (Some(dir), _) => crate::merge::companion_files(dir),
        (None, Some(t)) => std::fs::read(t)
            .map(|b| vec![("tokenizer.json".to_string(), b)])
            .unwrap_or_default(),
        (None, None) => vec![],
    }
}

/// Checks that a step of `gcfg`'s model on `rows` tokens fits the device's per-buffer binding
/// limit ([`GptConfig::largest_buffers`]) before any tensor exists: a clear error where the
/// driver would reject a launch mid-step (GPT-2's 147 MiB `wte` against llvmpipe's 128 MiB).
pub fn check_fits(
    gcfg: &GptConfig,
    rows: usize,
    precision: Precision,
    backend: Backend,
    device: &Device,
) -> anyhow::Result<()> {
    let elem = match precision {
        Precision::F32 => 4,
        Precision::F16 => 2,
    };
    lora_core::check_buffers(&gcfg.largest_buffers(rows, elem), device).map_err(|e| {
        anyhow::anyhow!(
            "--backend {}: {e}; use a CPU backend (--backend flex), a smaller model or a smaller batch",
            backend.name()
        )
    })
}

/// Run (or, with `resume`, continue) a fine-tuning run.
pub fn run(cfg: &FinetuneConfig, backend: Backend, resume: bool) -> anyhow::Result<RunReport> {
    let t_start = Instant::now();
    if cfg.out.exists() && !cfg.out.is_dir() {
        bail!("{}: --out is a file, not a folder", cfg.out.display());
    }
    let scaling = parse_scaling(&cfg.scaling)?;
    let device = cfg.compute.device(backend)?;
    let (model, gcfg, tok) = base_model(cfg, backend, &device)?;
    let targets: LoraTargets = if cfg.full {
        LoraTargets::default()
    } else {
        cfg.lora_targets
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--lora-targets: {e}"))?
    };

    // Data.
    let prepared = data::prepare(&cfg.data_options, &cfg.data, &tok)?;
    let seqs = prepared.sequences;
    let (train_idx, val_idx) = data::split(
        cfg.data_options.dataset,
        seqs.len(),
        cfg.seed,
        cfg.val_fraction,
    );
    ensure!(
        !train_idx.is_empty(),
        "{}: no training sequence left after the validation split",
        cfg.data.display()
    );
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("{}: cannot create the output folder", cfg.out.display()))?;
    remove_stale_temps(&cfg.out);
    let micro_per_epoch = train_idx.len().div_ceil(cfg.batch_size);
    let total_steps = cfg
        .max_iters
        .unwrap_or_else(|| (cfg.epochs * micro_per_epoch).div_ceil(cfg.grad_accum))
        .max(1);

    // Model: adapters (seeded), trainable set, stable parameter ids.
    let mut model = if cfg.full {
        model
    } else {
        device.seed(mix(cfg.seed, 0, 1));
        mark_only_lora_as_trainable(model.add_lora(
            targets,
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.lora_dropout,
            scaling,
        ))
    };
    model = cfg.compute.apply(path_param_ids(model.train()));
    let params = param_report(&model);
    println!("{params}");
    let mut optim: ModuleOptimizer = FusedAdamW {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-8,
        weight_decay: cfg.weight_decay as f32,
    }
    .init();

    // Resume: the newest checkpoint that reads back whole (a corrupt one is skipped, with a
    // warning, for the one before it).
    let ckpt = cfg.out.join("checkpoint");
    let metrics_path = cfg.out.join("metrics.jsonl");
    let (mut start, mut loss_acc, mut loss_n) = (0, 0.0f64, 0usize);
    let mut resumed = false;
    if resume {
        for dir in checkpoint_dirs(&cfg.out) {
            match read_checkpoint(&dir, cfg) {
                Ok((state, values, record)) => {
                    model = load_params_by_path(model, &values).map_err(|e| {
                        anyhow::anyhow!("{}: {e}", dir.join("params.safetensors").display())
                    })?;
                    optim = optim.load_record(record);
                    (start, loss_acc, loss_n) = (state.step, state.loss_acc, state.loss_n);
                    truncate_metrics(&metrics_path, start)?;
                    println!("resumed from step {start} ({})", dir.display());
                    resumed = true;
                    break;
                }
                Err(e) => eprintln!("warning: {e:#}; trying an earlier checkpoint"),
            }
        }
        if !resumed {
            println!(
                "--resume: no usable checkpoint in {}; starting fresh",
                cfg.out.display()
            );
        }
    }
    if !resumed {
        let _ = std::fs::remove_file(&metrics_path);
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("{}: cannot write", metrics_path.display()))?;
    let mut log = |m: &Metric| -> anyhow::Result<()> {
        writeln!(metrics, "{}", serde_json::to_string(m)?)
            .with_context(|| format!("{}: cannot write", metrics_path.display()))
    };

    println!(
        "sequences: {} train, {} validation, {} tokens each; {} steps of {}×{} sequences",
        train_idx.len(),
        val_idx.len(),
        seqs.seq_len(),
        total_steps,
        cfg.batch_size,
        cfg.grad_accum
    );
    let val0 = if start == 0 {
        let v = evaluate(&model, &seqs, &val_idx, cfg.batch_size, cfg.eval_batches);
        if let Some(v) = v {
            println!("step 0: val loss {v:.4}");
            log(&Metric {
                step: 0,
                split: "val".into(),
                loss: v,
                lr: 0.0,
                tokens_per_s: None,
            })?;
        }
        v
    } else {
        None
    };

    let mut order = Order {
        train: train_idx.clone(),
        seed: cfg.seed,
        epoch: None,
    };
    let (mut tokens_since, mut t_log) = (0usize, Instant::now());
    let (mut tokens_total, t_train) = (0usize, Instant::now());
    let mut last_train = None;
    let mut last_val = None;
    let mut optim_bytes = None;
    // f16 gradients underflow without loss scaling (as with `torch.autocast(float16)`, which
    // needs PyTorch's `GradScaler`); a resumed run starts the scale afresh.
    let mut scaler = (cfg.compute.precision == Precision::F16).then(LossScaler::f16);
    // The last step whose loss is still on its way back (0-based index).
    let mut reading: Option<(usize, Settling)> = None;
    for step in start..total_steps {
        let lr = lr_at(cfg, step, total_steps);
        // Dropout masks depend only on (seed, step): a resumed run draws the same ones.
        device.seed(mix(cfg.seed, 2, step as u64));
        let micro = (0..cfg.grad_accum).map(|m| {
            let first = (step * cfg.grad_accum + m) * cfg.batch_size;
            let idx: Vec<usize> = (first..first + cfg.batch_size)
                .map(|p| order.at(p))
                .collect();
            let (x, y, _) = batch(&seqs, &idx, &device);
            (x, y)
        });
        let scale = scaler.as_ref().map_or(1.0, LossScaler::scale);
        let (loss, grads) = accumulate_grads(&model, micro.collect(), cfg.grad_accum, scale);
        let (stepped, settling) =
            settle_step(model, loss, grads, scaler.as_mut(), cfg.clip, |m, g| {
                optim.step(lr, m, g)
            });
        model = stepped;
        let step_tokens = cfg.grad_accum * cfg.batch_size * seqs.seq_len();
        tokens_since += step_tokens;
        tokens_total += step_tokens;
        let done = step + 1;
        let log_now = done % cfg.log_every.max(1) == 0 || done == total_steps;
        let eval_now = (cfg.eval_every > 0 && done % cfg.eval_every == 0) || done == total_steps;
        let save_now = (cfg.save_every > 0 && done % cfg.save_every == 0) || done == total_steps;
        // The step before's loss is back by now, or soon (its read was queued ahead of this
        // step's work, which the device runs meanwhile); logs, evaluations and checkpoints need
        // this step's too.
        let before = reading.replace((step, settling));
        let now = (log_now || eval_now || save_now)
            .then(|| reading.take())
            .flatten();
        for (at, settling) in before.into_iter().chain(now) {
            let settled = settling.wait(scaler.as_mut());
            // Stop on a non-finite loss (no checkpoint has it: one is saved only after its
            // step's loss is read), report overflows, add it to the running mean.
            let loss = settled.loss;
            if !loss.is_finite() {
                let kept = if ckpt.join("state.json").is_file() {
                    format!("the last good checkpoint is in {}", ckpt.display())
                } else {
                    "no checkpoint was written yet".to_string()
                };
                bail!("loss is {loss} at step {}: stopped; {kept}", at + 1);
            }
            let scale_now = scaler.as_ref().map_or(1.0, LossScaler::scale);
            if let Some(scale) = settled.late_overflow {
                println!(
                    "step {}: f16 gradients overflowed at loss scale {scale}: it ran as a zero-gradient step; scale now {scale_now}",
                    at + 1
                );
            }
            if !settled.take {
                println!(
                    "step {}: f16 gradients overflowed at a new loss scale: step skipped, scale now {scale_now}",
                    at + 1
                );
            }
            loss_acc += loss;
            loss_n += 1;
        }
        if log_now {
            let tps = tokens_since as f64 / t_log.elapsed().as_secs_f64().max(1e-9);
            let loss = loss_acc / loss_n as f64;
            let eta = t_train.elapsed().as_secs_f64() / (done - start) as f64
                * (total_steps - done) as f64;
            println!(
                "step {done}/{total_steps}: loss {loss:.4}  ppl {:.2}  lr {lr:.3e}  {tps:.0} tokens/s  eta {eta:.0} s",
                loss.exp()
            );
            log(&Metric {
                step: done,
                split: "train".into(),
                loss,
                lr,
                tokens_per_s: Some(tps),
            })?;
            last_train = Some(loss);
            (loss_acc, loss_n, tokens_since, t_log) = (0.0, 0, 0, Instant::now());
        }
        if eval_now
            && let Some(v) = evaluate(&model, &seqs, &val_idx, cfg.batch_size, cfg.eval_batches)
        {
            println!("step {done}: val loss {v:.4}  ppl {:.2}", v.exp());
            log(&Metric {
                step: done,
                split: "val".into(),
                loss: v,
                lr,
                tokens_per_s: None,
            })?;
            last_val = Some(v);
        }
        if save_now {
            optim_bytes = Some(save_checkpoint(
                &ckpt,
                cfg,
                done,
                (loss_acc, loss_n),
                &model,
                &optim,
            )?);
        }
    }
    let out_dir = write_result(cfg, &gcfg, &model, targets, scaling)?;
    println!("wrote {}", out_dir.display());
    let curves = crate::plot::run_curves(&crate::plot::read_metrics(&metrics_path)?, "");
    let title = if cfg.full {
        "full fine-tuning"
    } else {
        "LoRA fine-tuning"
    };
    crate::plot::loss_png(&cfg.out.join("loss.png"), title, &curves)?;
    let report = RunReport {
        config: cfg.clone(),
        backend: backend.name().into(),
        params,
        // The last checkpoint's record (a run resumed at its end saved none: serialize it now).
        optimizer_state_bytes: match optim_bytes {
            Some(n) => n,
            None => optim.to_record().into_bytes().map(|b| b.len()).unwrap_or(0),
        },
        sequences: (train_idx.len(), val_idx.len()),
        steps: total_steps,
        resumed_from: start,
        final_train_loss: last_train,
        val_loss: (val0, last_val),
        wall_s: t_start.elapsed().as_secs_f64(),
        tokens_per_s: tokens_total as f64 / t_train.elapsed().as_secs_f64().max(1e-9),
        peak_rss_mib: crate::bench::peak_rss_mib(),
    };
    write_json_atomic(&cfg.out.join("run.json"), &report)?;
    Ok(report)
}

/// Keep only the metrics lines up to `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: usize) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Metric>(l)
                .map(|m| m.step <= step)
                .unwrap_or(false)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// Checkpoint folders of `out`, newest first: `checkpoint/`, then `checkpoint.prev/`.
fn checkpoint_dirs(out: &Path) -> Vec<PathBuf> {
    ["checkpoint", "checkpoint.prev"]
        .iter()
        .map(|n| out.join(n))
        .filter(|d| d.is_dir())
        .collect()
}

type CheckpointData = (CheckpointState, ValuesByPath, burn::optim::OptimizerRecord);

/// Read and verify a checkpoint folder.
fn read_checkpoint(dir: &Path, cfg: &FinetuneConfig) -> anyhow::Result<CheckpointData> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))
    };
    let state: CheckpointState =
        serde_json::from_slice(&read("state.json")?).with_context(|| {
            format!(
                "{}: corrupt checkpoint state",
                dir.join("state.json").display()
            )
        })?;
    ensure!(
        state.config.resume_key() == cfg.resume_key(),
        "{}: the checkpoint was made with other settings; resume with the same flags",
        dir.display()
    );
    let params = read("params.safetensors")?;
    let optim = read("optimizer.bpk")?;
    ensure!(
        (fnv1a(&params), fnv1a(&optim)) == state.checksums,
        "{}: checksum mismatch (a corrupt or partial checkpoint)",
        dir.display()
    );
    let values = params_from_bytes(&params, &dir.join("params.safetensors"))?;
    let record =
        burn::optim::OptimizerRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(optim))
            .map_err(|e| {
                anyhow::anyhow!("{}: corrupt: {e:?}", dir.join("optimizer.bpk").display())
            })?;
    Ok((state, values, record))
}

/// Write `OUT/checkpoint/` (trainable parameters, optimizer state, step) as one atomic folder
/// swap; the one it replaces is kept as `checkpoint.prev/`. Returns the optimizer state's size.
fn save_checkpoint(
    dir: &Path,
    cfg: &FinetuneConfig,
    step: usize,
    (loss_acc, loss_n): (f64, usize),
    model: &Gpt,
    optim: &ModuleOptimizer,
) -> anyhow::Result<usize> {
    let params = export::safetensors_bytes(&params_by_path(model, |_, trainable| trainable))?;
    let optim_bytes = optim
        .to_record()
        .into_bytes()
        .map_err(|e| anyhow::anyhow!("optimizer state: {e:?}"))?
        .to_vec();
    let state = CheckpointState {
        step,
        config: cfg.clone(),
        loss_acc,
        loss_n,
        checksums: (fnv1a(&params), fnv1a(&optim_bytes)),
    };
    let prev = dir.with_extension("prev");
    if dir.is_dir() {
        let _ = std::fs::remove_dir_all(&prev);
        std::fs::rename(dir, &prev)
            .with_context(|| format!("{}: cannot keep the previous checkpoint", dir.display()))?;
    }
    let size = optim_bytes.len();
    write_dir_atomic(
        dir,
        &[
            ("params.safetensors".into(), params),
            ("optimizer.bpk".into(), optim_bytes),
            ("state.json".into(), serde_json::to_vec_pretty(&state)?),
        ],
    )?;
    Ok(size)
}
