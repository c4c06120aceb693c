//! `generate` and `eval` on a Hugging Face GPT-2 folder, with an optional PEFT adapter.

use anyhow::Context;
use burn::tensor::Device;
use lora_data::Tokenizer;
use lora_gpt::Gpt;
use lora_gpt::gpt2::{Gpt2Folder, load_peft_adapter};
use lora_gpt::mingpt::ids_tensor;
use std::path::Path;

/// Load the model in `dir` (and the adapter in `adapter`) for inference, and its tokenizer.
pub fn load(
    dir: &Path,
    adapter: Option<&Path>,
    device: &Device,
) -> anyhow::Result<(Gpt, Tokenizer)> {
    let folder = Gpt2Folder::open(dir)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)?;
    check_vocab(&tokenizer, &tok_path, folder.config.gpt_config().vocab_size)?;
    let model = folder.load(|c| c, device)?;
    let model = match adapter {
        Some(a) => load_peft_adapter(model, a)?.0,
        None => model,
    };
    Ok((model.eval(), tokenizer))
}

/// Fail when the tokenizer can produce ids the model has no embedding row for.
pub fn check_vocab(tok: &Tokenizer, tok_path: &Path, model_vocab: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        tok.vocab_size() <= model_vocab,
        "{}: the tokenizer has {} tokens, more than the model's vocab_size {model_vocab}",
        tok_path.display(),
        tok.vocab_size()
    );
    Ok(())
}

/// Sampling settings of `generate`.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// Greedy (argmax) decoding.
    pub greedy: bool,
    /// Softmax temperature.
    pub temperature: f64,
    /// Keep the k most likely tokens.
    pub top_k: Option<usize>,
}

/// Prompt ids and prompt + new ids.
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    max_new_tokens: usize,
    s: Sampling,
    device: &Device,
) -> anyhow::Result<Vec<u32>> {
    anyhow::ensure!(
        !prompt.is_empty(),
        "--prompt: the prompt encodes to no tokens"
    );
    anyhow::ensure!(
        s.temperature.is_finite() && s.temperature > 0.0,
        "--temperature must be positive"
    );
    let vocab = model.wte.weight.dims()[0];
    if let Some(k) = s.top_k {
        anyhow::ensure!(
            k >= 1 && k <= vocab,
            "--top-k must be between 1 and the vocabulary size {vocab}"
        );
    }
    let idx = ids_tensor(
        prompt.iter().map(|&t| t as i64).collect(),
        [1, prompt.len()],
        device,
    );
    let out = model.generate(idx, max_new_tokens, s.temperature, !s.greedy, s.top_k);
    Ok(out.into_data().iter::<i64>().map(|t| t as u32).collect())
}

/// Result of `eval`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct EvalReport {
    /// Tokens in the file.
    pub tokens: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// Mean next-token cross-entropy.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

/// Next-token loss over `ids`, cut into consecutive windows of `block_size` (the last, shorter window
/// kept if it has at least 2 tokens): summed cross-entropy of every prediction inside each window
/// divided by their count.
pub fn eval_ids(
    model: &Gpt,
    ids: &[u32],
    block_size: usize,
    device: &Device,
) -> anyhow::Result<EvalReport> {
    anyhow::ensure!(block_size >= 2, "--block-size must be at least 2");
    anyhow::ensure!(
        block_size <= model.block_size,
        "--block-size {block_size} is larger than the model's n_positions {}",
        model.block_size
    );
    let windows: Vec<&[u32]> = ids.chunks(block_size).filter(|w| w.len() >= 2).collect();
    anyhow::ensure!(!windows.is_empty(), "the text has fewer than 2 tokens");
    let (mut sum, mut count) = (0f64, 0usize);
    // Full windows in batches of 8, the short last one alone.
    let full: Vec<&[u32]> = windows
        .iter()
        .copied()
        .filter(|w| w.len() == block_size)
        .collect();
    let short: Vec<&[u32]> = windows
        .iter()
        .copied()
        .filter(|w| w.len() < block_size)
        .collect();
    for group in full.chunks(8).chain(short.chunks(1)) {
        let (b, t) = (group.len(), group[0].len());
        let flat: Vec<i64> = group
            .iter()
            .flat_map(|w| w.iter().map(|&x| x as i64))
            .collect();
        let idx = ids_tensor(flat, [b, t], device);
        // Without the `[8, block, vocab]` logits (1.6 GB for GPT-2 at 1024).
        let loss = model.causal_loss(idx);
        let n = b * (t - 1);
        sum += loss.into_scalar::<f32>() as f64 * n as f64;
        count += n;
    }
    let loss = sum / count as f64;
    Ok(EvalReport {
        tokens: ids.len(),
        windows: windows.len(),
        loss,
        perplexity: loss.exp(),
    })
}

/// Read a text file, naming it on failure.
pub fn read_text(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", path.display()))
}

/// safetensors bytes of `input_ids` `[1, n]` (as f32) and the model's `logits` `[1, n, vocab]`.
pub fn logits_safetensors(model: &Gpt, ids: &[u32], device: &Device) -> anyhow::Result<Vec<u8>> {
    let n = ids.len();
    let idx = ids_tensor(ids.iter().map(|&i| i as i64).collect(), [1, n], device);
    let logits = model.forward(idx);
    let dims = logits.dims().to_vec();
    let values = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("logits: {e:?}"))?;
    Ok(lora_gpt::export::safetensors_bytes(&[
        (
            "input_ids".into(),
            vec![1, n],
            ids.iter().map(|&i| i as f32).collect(),
        ),
        ("logits".into(), dims, values),
    ])?)
}
