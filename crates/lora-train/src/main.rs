//! `lora-train`: LoRA fine-tuning of GPT models on Burn.

use clap::{Parser, Subcommand};
use lora_gpt::LoraTargets;
use lora_train::data::{self, Cleaning, DataOptions, Dataset};
use lora_train::finetune::{self, Compute, FinetuneConfig, Schedule};
use lora_train::fsutil::write_json_atomic;
use lora_train::sort_demo::{self, SortDemoConfig};
use lora_train::{Backend, lm};
use std::path::PathBuf;
use std::process::ExitCode;

// Tensors of a few hundred KB are allocated and freed on every op; glibc returns them to the OS
// each time (mmap threshold), mimalloc keeps them: ~2x faster CPU training here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` (mimalloc v3's `mi_option_e`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed pages instead of returning them to the OS a second later (mimalloc v3's default): a
/// training step frees and re-allocates the same sizes, and each returned page came back as a page
/// fault and a zeroed 2 MiB huge page (~5 % of a minGPT step on flex; 8× fewer page faults). The
/// peak stays what it was; the resident size no longer shrinks after it.
fn keep_freed_pages() {
    // SAFETY: called first thing in `main`, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(
    name = "lora-train",
    version,
    about = "LoRA fine-tuning of GPT models on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The minGPT LoRA exercise: pre-train on length 6, fail on 10, recover with LoRA.
    SortDemo(SortDemoArgs),
    /// Continue a prompt with a Hugging Face GPT-2 folder (and a PEFT adapter).
    Generate(GenerateArgs),
    /// Next-token loss and perplexity of a model over a text file.
    Eval(EvalArgs),
    /// LoRA (or full) fine-tuning of GPT-2 on Alpaca, News Articles or plain text.
    Finetune(Box<FinetuneArgs>),
    /// Merge a PEFT adapter into its GPT-2 and write a Hugging Face folder.
    Merge(MergeArgs),
    /// Several runs' loss curves on one plot (e.g. LoRA vs --full).
    Compare(CompareArgs),
    /// Dataset tools (`inspect`, `clean-news`).
    Data(DataArgs),
    /// Benchmarks (`infer`, `data`); each writes target/bench/<suite>.json.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(clap::Args)]
struct DataArgs {
    #[command(subcommand)]
    action: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Rows, tokens, sequences, masked fraction and the first formatted example.
    Inspect(InspectArgs),
    /// Recipe C's Articles.txt: the cleaned articles of Articles.csv, concatenated.
    CleanNews(CleanNewsArgs),
}

/// How a data file becomes training sequences (shared by `data inspect` and `finetune`).
#[derive(clap::Args)]
struct DataFlags {
    /// Dataset kind.
    #[arg(long, value_enum)]
    dataset: Dataset,
    /// Data file.
    #[arg(long)]
    data: PathBuf,
    /// Sequence length (alpaca; default 1024).
    #[arg(long, conflicts_with = "block_size")]
    max_seq_len: Option<usize>,
    /// Block length (news, text; default 128).
    #[arg(long)]
    block_size: Option<usize>,
    /// Ignore the loss on prompt tokens (alpaca).
    #[arg(long)]
    mask_prompt: bool,
    /// One example per sequence, right-padded, instead of packing (alpaca).
    #[arg(long)]
    no_packing: bool,
    /// News cleaning.
    #[arg(long, value_enum, default_value = "basic")]
    cleaning: Cleaning,
    /// Keep only news rows of this NewsType (e.g. sports, business).
    #[arg(long)]
    news_type: Option<String>,
}

impl DataFlags {
    fn options(&self) -> anyhow::Result<DataOptions> {
        let seq_len = self.max_seq_len.or(self.block_size);
        anyhow::ensure!(
            seq_len.is_none_or(|n| n >= 2),
            "--max-seq-len / --block-size must be at least 2"
        );
        Ok(DataOptions {
            dataset: self.dataset,
            seq_len,
            mask_prompt: self.mask_prompt,
            packing: !self.no_packing,
            cleaning: self.cleaning,
            news_type: self.news_type.clone(),
        })
    }
}

#[derive(clap::Args)]
struct InspectArgs {
    #[command(flatten)]
    data: DataFlags,
    /// Model folder (for its tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct CleanNewsArgs {
    /// Articles.csv.
    #[arg(long)]
    input: PathBuf,
    /// Text file to write.
    #[arg(long)]
    output: PathBuf,
    /// Cleaning.
    #[arg(long, value_enum, default_value = "basic")]
    cleaning: Cleaning,
    /// Keep only rows of this NewsType.
    #[arg(long)]
    news_type: Option<String>,
}

fn data(a: DataArgs) -> anyhow::Result<()> {
    match a.action {
        DataCommand::Inspect(a) => {
            let r = data::inspect(&a.data.options()?, &a.data.data, &a.model)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{:?}: rows {} (with input {:?}, skipped {}{})  tokens {}  sequences {}  masked {:.4}\n--- first example ---\n{}",
                    r.dataset,
                    r.rows,
                    r.rows_with_input,
                    r.rows_skipped,
                    r.skipped_reasons
                        .iter()
                        .map(|s| format!("; {s}"))
                        .collect::<String>(),
                    r.tokens,
                    r.sequences,
                    r.masked_fraction,
                    r.first_example
                );
            }
        }
        DataCommand::CleanNews(a) => {
            let t = std::time::Instant::now();
            let r = data::clean_news(&a.input, &a.output, a.cleaning, a.news_type.as_deref())?;
            println!(
                "{}: {} of {} rows, {} characters ({:.2} s)",
                a.output.display(),
                r.kept,
                r.rows,
                r.chars,
                t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum BenchCommand {
    /// GPT-2-small forward: base vs LoRA unmerged vs merged.
    Infer(InferArgs),
    /// Dataset loading: Alpaca load + pack, news cleaning, blocking.
    Data(BenchDataArgs),
    /// GPT-2-shaped training step: LoRA (c_attn; attn + MLP) vs full fine-tuning.
    Finetune(BenchFinetuneArgs),
    /// The sort exercise's ms/iter and peak RSS next to the PyTorch reference.
    Sort(BenchSortArgs),
    /// One LoRA layer (768 → 2304, r 8): factored vs Burn's apply_lora vs a plain frozen Linear.
    LoraLayer(BenchLayerArgs),
    /// GPT-2's linear and attention products, Burn's and ours, by operand layout (a probe).
    Matmul(BenchMatmulArgs),
}

#[derive(clap::Args)]
struct BenchMatmulArgs {
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
    /// Element type.
    #[arg(long, value_enum, default_value = "f32")]
    precision: lora_train::finetune::Precision,
    /// Rows of the left-hand side (batch × sequence).
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Timed rounds of 10 products (median reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Report path.
    #[arg(long, default_value = "target/bench/matmul.json")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct BenchLayerArgs {
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
    /// Tokens (batch × sequence: 8 × 128 on CPU, 8 × 1024 on a GPU).
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    /// Timed iterations (median reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Passes (forward + backward) queued per iteration before waiting for the device; 1 times
    /// each pass alone, host launch time included; on a GPU, 10 measures the pipelined cost a
    /// layer has in training.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Run one variant in this process (used by the suite itself).
    #[arg(long, hide = true)]
    only: Option<String>,
    /// Report path.
    #[arg(long, default_value = "target/bench/lora-layer.json")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct BenchSortArgs {
    /// Our backends, comma separated (ratios use the first).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "flex,ndarray"
    )]
    backend: Vec<Backend>,
    /// Pre-training iterations (the exercise's; fewer make PyTorch's warm-up weigh more).
    #[arg(long, default_value_t = 1000)]
    pretrain_iters: usize,
    /// Fine-tuning iterations.
    #[arg(long, default_value_t = 2000)]
    finetune_iters: usize,
    /// Threads on both sides (PyTorch's recorded runs used 1).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The PyTorch reference script.
    #[arg(long, default_value = "../shared/reference/sort_lora_reference.py")]
    reference: PathBuf,
    /// Report path.
    #[arg(long, default_value = "target/bench/sort.json")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct BenchFinetuneArgs {
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Layers (GPT-2 small: 12).
    #[arg(long, default_value_t = 12)]
    n_layer: usize,
    /// Timed steps per variant, one window between two syncs (after one warm-up step on the CPU;
    /// on a GPU three, then an untimed window of four).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Rounds of all the variants, each variant a fresh process a round; each row is the
    /// variant's median round (a GPU's first processes of a session can run a few % slow).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[command(flatten)]
    compute: Compute,
    /// Run one variant in this process (used by the suite itself).
    #[arg(long, hide = true)]
    only: Option<String>,
    /// The PEFT anchor run next to ours on a GPU backend (when python3 has torch with CUDA, peft
    /// and transformers; gives `ratios.ours_over_peft_time`).
    #[arg(long, default_value = "../shared/reference/gpu_anchor_peft.py")]
    peft: PathBuf,
    /// Skip the PEFT anchor.
    #[arg(long)]
    no_peft: bool,
    /// Report path.
    #[arg(long, default_value = "target/bench/finetune.json")]
    out: PathBuf,
}

/// Which positions' logits the infer bench computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Logits {
    /// Every position.
    All,
    /// The last position only.
    Last,
}

#[derive(clap::Args)]
struct InferArgs {
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
    /// Tokens per forward pass (batch 1).
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Layers with LoRA: attn (c_attn, attn c_proj) plus any of mlp (c_fc, mlp c_proj); the
    /// default is the PEFT anchor's `target_modules=["c_attn", "c_proj", "c_fc"]`.
    #[arg(long, default_value = "attn,mlp")]
    lora_targets: LoraTargets,
    /// Timed rounds (median reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Forward passes per round, read back once (on a GPU, 10 measures the pipelined throughput:
    /// single passes on wgpu were bimodal on an H100).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Logits of every position (a scoring pass, as transformers' forward) or only of the last
    /// (a generation step's prefill).
    #[arg(long, value_enum, default_value = "all")]
    logits: Logits,
    /// Print every timed pass (wall and process CPU ms) to stderr as it ends.
    #[arg(long)]
    trace: bool,
    /// Time each variant in its own process, N processes per variant (rounds in shuffled order;
    /// the median of the processes' medians is reported). 0: all variants in this process.
    #[arg(long, default_value_t = 0)]
    isolate: usize,
    /// Run one variant in this process (used by `--isolate`).
    #[arg(long, hide = true)]
    only: Option<String>,
    /// Report path.
    #[arg(long, default_value = "target/bench/infer.json")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct BenchDataArgs {
    /// Folder with alpaca/alpaca_en_demo.json, news-articles/Articles.csv, tinyshakespeare/input.txt.
    #[arg(long, default_value = "../shared/data")]
    data_dir: PathBuf,
    /// GPT-2 tokenizer.json.
    #[arg(
        long,
        default_value = "crates/lora-data/tests/fixtures/gpt2-tokenizer.json"
    )]
    tokenizer: PathBuf,
    /// Timed rounds (median reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Report path.
    #[arg(long, default_value = "target/bench/data.json")]
    out: PathBuf,
}

fn bench(c: BenchCommand) -> anyhow::Result<()> {
    match c {
        BenchCommand::Infer(a) => {
            let b = lora_train::bench::InferBench {
                backend: a.backend,
                seq: a.seq,
                rank: a.rank,
                targets: a.lora_targets,
                iters: a.iters.max(1),
                reps: a.reps,
                all_logits: a.logits == Logits::All,
                trace: a.trace,
                isolate: a.isolate,
                only: a
                    .only
                    .as_deref()
                    .map(lora_train::bench::infer_variant)
                    .transpose()?,
            };
            lora_train::bench::infer(&b, &a.out)?;
        }
        BenchCommand::Finetune(a) => {
            let shape = lora_train::bench::FinetuneShape {
                batch: a.batch,
                seq: a.seq,
                n_layer: a.n_layer,
                steps: a.steps.max(1),
                compute: a.compute,
            };
            let peft = (!a.no_peft).then_some(a.peft.as_path());
            lora_train::bench::finetune(
                a.backend,
                shape,
                a.rounds.max(1),
                a.only.as_deref(),
                peft,
                &a.out,
            )?;
        }
        BenchCommand::LoraLayer(a) => {
            lora_train::bench::lora_layer(
                a.backend,
                a.tokens,
                a.iters,
                a.reps,
                a.only.as_deref(),
                &a.out,
            )?;
        }
        BenchCommand::Matmul(a) => {
            let dtype = match a.precision {
                lora_train::finetune::Precision::F32 => burn::tensor::DType::F32,
                lora_train::finetune::Precision::F16 => burn::tensor::DType::F16,
            };
            lora_train::bench::matmul(a.backend, dtype, a.tokens, a.iters, &a.out)?;
        }
        BenchCommand::Sort(a) => {
            anyhow::ensure!(!a.backend.is_empty(), "--backend: give at least one");
            let b = lora_train::bench::SortBench {
                backends: a.backend,
                pretrain_iters: a.pretrain_iters.max(1),
                finetune_iters: a.finetune_iters.max(1),
                threads: a.threads.max(1),
                reference: a.reference,
            };
            lora_train::bench::sort(&b, &a.out)?;
        }
        BenchCommand::Data(a) => {
            lora_train::bench::data(&a.data_dir, &a.tokenizer, a.iters, &a.out)?;
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Tokens to add.
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// Argmax decoding (default when no sampling flag is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k"])]
    greedy: bool,
    /// Sample with this softmax temperature.
    #[arg(long)]
    temperature: Option<f64>,
    /// Sample from the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print `{"prompt_ids", "ids", "text"}`.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file.
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens (default: the model's n_positions).
    #[arg(long)]
    block_size: Option<usize>,
    /// Print `{"tokens", "windows", "loss", "perplexity"}`.
    #[arg(long)]
    json: bool,
    /// Also write the first window's `input_ids` and `logits` (safetensors), to compare with
    /// transformers / PEFT (`tools/check_peft_adapter.py`).
    #[arg(long)]
    dump_logits: Option<PathBuf>,
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let device = args.model.backend.device()?;
    device.seed(args.seed);
    let (model, tok) = lm::load(&args.model.model, args.model.adapter.as_deref(), &device)?;
    let prompt = tok.encode(&args.prompt);
    let sampling = lm::Sampling {
        greedy: args.temperature.is_none() && args.top_k.is_none(),
        temperature: args.temperature.unwrap_or(1.0),
        top_k: args.top_k,
    };
    let ids = lm::generate(&model, &prompt, args.max_new_tokens, sampling, &device)?;
    let text = tok.decode(&ids[prompt.len()..]);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"prompt_ids": prompt, "ids": ids, "text": text})
        );
    } else {
        println!("{}{}", args.prompt, text);
    }
    Ok(())
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let device = args.model.backend.device()?;
    let (model, tok) = lm::load(&args.model.model, args.model.adapter.as_deref(), &device)?;
    let text = lm::read_text(&args.text)?;
    let ids = tok.encode(&text);
    let block = args.block_size.unwrap_or(model.block_size);
    let r = lm::eval_ids(&model, &ids, block, &device)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.text.display()))?;
    if let Some(path) = &args.dump_logits {
        let window = &ids[..ids.len().min(block)];
        let bytes = lm::logits_safetensors(&model, window, &device)?;
        lora_train::fsutil::write_atomic(path, &bytes)?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "tokens {}  windows {}  loss {:.6}  perplexity {:.4}",
            r.tokens, r.windows, r.loss, r.perplexity
        );
    }
    Ok(())
}

#[derive(clap::Args)]
struct FinetuneArgs {
    /// Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long, conflicts_with = "model_type")]
    model: Option<PathBuf>,
    /// Start from random weights of this shape (gpt2, gpt2-medium, gpt-nano, …).
    #[arg(long)]
    model_type: Option<String>,
    /// Layers of the --model-type (scaled-down runs).
    #[arg(long, requires = "model_type")]
    n_layer: Option<usize>,
    /// tokenizer.json (default: the model folder's; needed with --model-type).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    data: DataFlags,
    /// Share of sequences held out for validation (alpaca: shuffled; news, text: the end).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Output folder (adapter/ or model/, metrics.jsonl, run.json, checkpoint/).
    #[arg(long)]
    out: PathBuf,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
    /// Train every weight (no adapters).
    #[arg(long)]
    full: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// Adapted layers (PEFT names): c_attn, c_proj, c_fc, wte, wpe, attn, mlp, all-linear.
    #[arg(long, default_value = "c_attn")]
    lora_targets: String,
    /// Scaling: alpha-over-rank (PEFT), alpha (recipes B, D), rslora.
    #[arg(long, default_value = "alpha-over-rank")]
    scaling: String,
    /// Optimizer steps (default: --epochs worth).
    #[arg(long, conflicts_with = "epochs")]
    max_iters: Option<usize>,
    /// Passes over the training data.
    #[arg(long)]
    epochs: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Schedule after the warm-up.
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: Schedule,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Validation every N steps (0: at the end only).
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Batches per validation (0: all).
    #[arg(long, default_value_t = 20)]
    eval_batches: usize,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Log every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    compute: Compute,
    /// Continue from OUT/checkpoint (same flags).
    #[arg(long)]
    resume: bool,
}

fn finetune(a: FinetuneArgs) -> anyhow::Result<()> {
    let opts = a.data.options()?;
    let cfg = FinetuneConfig {
        model: a.model,
        model_type: a.model_type,
        n_layer: a.n_layer,
        tokenizer: a.tokenizer,
        data: a.data.data.clone(),
        // The length in effect, so run.json and resume checks state it.
        data_options: DataOptions {
            seq_len: Some(opts.seq_len()),
            ..opts
        },
        val_fraction: a.val_fraction,
        out: a.out,
        full: a.full,
        lora_rank: a.lora_rank,
        lora_alpha: a.lora_alpha,
        lora_dropout: a.lora_dropout,
        lora_targets: a.lora_targets,
        scaling: a.scaling,
        max_iters: a.max_iters,
        epochs: a.epochs.unwrap_or(1),
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr: a.lr,
        warmup: a.warmup,
        schedule: a.schedule,
        weight_decay: a.weight_decay,
        clip: a.clip,
        eval_every: a.eval_every,
        eval_batches: a.eval_batches,
        save_every: a.save_every,
        log_every: a.log_every,
        seed: a.seed,
        compute: a.compute,
    };
    let r = finetune::run(&cfg, a.backend, a.resume)?;
    println!(
        "done: {} steps, train loss {:?}, val loss {:?} -> {:?}, {:.0} tokens/s, peak RSS {:.0} MiB",
        r.steps,
        r.final_train_loss,
        r.val_loss.0,
        r.val_loss.1,
        r.tokens_per_s,
        r.peak_rss_mib.unwrap_or(0.0)
    );
    Ok(())
}

#[derive(clap::Args)]
struct CompareArgs {
    /// Run folders (each with metrics.jsonl).
    #[arg(long, num_args = 1.., required = true)]
    runs: Vec<PathBuf>,
    /// PNG to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// Base Hugging Face GPT-2 folder.
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    out: PathBuf,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
}

fn merge(a: MergeArgs) -> anyhow::Result<()> {
    let device = a.backend.device()?;
    let report = lora_train::merge::merge(&a.model, &a.adapter, &a.out, &device)?;
    println!(
        "{}: merged {} adapter tensors; head {}",
        a.out.display(),
        report.adapter_tensors,
        if report.tied {
            "tied to wte"
        } else {
            "untied (lm_head.weight written, tie_word_embeddings false)"
        }
    );
    Ok(())
}

#[derive(clap::Args)]
struct SortDemoArgs {
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
    /// Seeds to run, comma separated (one report each).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seed: Vec<u64>,
    /// Pre-training iterations (length 6).
    #[arg(long, default_value_t = 1000)]
    pretrain_iters: usize,
    /// LoRA fine-tuning iterations (length 10).
    #[arg(long, default_value_t = 2000)]
    finetune_iters: usize,
    /// Sequences evaluated per split (minGPT: 50 batches of 100).
    #[arg(long, default_value_t = 5000)]
    eval_samples: usize,
    /// Layers with LoRA while fine-tuning: attn plus any of mlp, wpe, wte.
    #[arg(long, default_value = "attn")]
    lora_targets: LoraTargets,
    /// Model block size.
    #[arg(long, default_value_t = 24)]
    block_size: usize,
    /// JSON report path (several seeds: `-seedN` is added before the extension).
    #[arg(long, default_value = "target/sort-demo/report.json")]
    report: PathBuf,
}

fn report_path(base: &std::path::Path, seed: u64, many: bool) -> PathBuf {
    if !many {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    let ext = base
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    base.with_file_name(format!("{stem}-seed{seed}{ext}"))
}

fn sort_demo(args: SortDemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.seed.is_empty(), "--seed: give at least one seed");
    anyhow::ensure!(args.eval_samples > 0, "--eval-samples must be at least 1");
    let many = args.seed.len() > 1;
    let mut reports = Vec::new();
    for &seed in &args.seed {
        let cfg = SortDemoConfig {
            backend: args.backend,
            seed,
            pretrain_iters: args.pretrain_iters,
            finetune_iters: args.finetune_iters,
            eval_samples: args.eval_samples,
            lora_targets: args.lora_targets,
            block_size: args.block_size,
            ..SortDemoConfig::default()
        };
        let report = sort_demo::run(&cfg)?;
        let path = report_path(&args.report, seed, many);
        write_json_atomic(&path, &report)?;
        println!("report: {}", path.display());
        reports.push(report);
    }
    println!(
        "\nAccuracy (% of sequences fully sorted; train / test), backend {}, LoRA targets {}:\n",
        args.backend.name(),
        args.lora_targets
    );
    print!("{}", sort_demo::table(&reports));
    Ok(())
}

fn main() -> ExitCode {
    keep_freed_pages();
    let cli = Cli::parse();
    if let Command::Finetune(a) = &cli.command {
        // SAFETY: still the only thread (the worker pool starts below).
        unsafe { a.backend.pin_default_device() };
    }
    let result = lora_train::on_worker_pool(move || match cli.command {
        Command::SortDemo(args) => sort_demo(args),
        Command::Generate(args) => generate(args),
        Command::Eval(args) => eval(args),
        Command::Finetune(a) => finetune(*a),
        Command::Merge(a) => merge(a),
        Command::Compare(a) => lora_train::plot::compare(&a.runs, &a.out)
            .map(|_| println!("wrote {}", a.out.display())),
        Command::Data(a) => data(a),
        Command::Bench(c) => bench(c),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// [`super::MI_OPTION_PURGE_DELAY`] names mimalloc's purge delay: v3's default is 1000 (ms).
    #[test]
    fn purge_delay_option_index() {
        // SAFETY: reads an option.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) },
            1000
        );
    }
}
