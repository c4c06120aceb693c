//! `lora-train merge`: a PEFT adapter merged into its GPT-2, written as a Hugging Face folder.

use crate::fsutil::write_dir_atomic;
use burn::tensor::Device;
use lora_gpt::export;
use lora_gpt::gpt2::{Gpt2Folder, load_peft_adapter};
use lora_gpt::{Gpt, GptConfig};
use std::path::Path;

/// What `merge` wrote.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// Adapter tensors merged.
    pub adapter_tensors: usize,
    /// Whether the written head is tied to `wte`.
    pub tied: bool,
}

/// Merge `adapter` into the GPT-2 of `model` and write `out` (`config.json`, `model.safetensors`
/// in the `save_pretrained` layout, tokenizer files copied). When the adapter touches the tied
/// `wte`, `lm_head.weight` (the base table) is written and `tie_word_embeddings` set false, so
/// transformers loads a model equal to the un-merged adapter model. Non-finite merged weights are
/// an error (PEFT's `safe_merge`).
pub fn merge(
    model: &Path,
    adapter: &Path,
    out: &Path,
    device: &Device,
) -> anyhow::Result<MergeReport> {
    let folder = Gpt2Folder::open(model)?;
    let base = folder.load(|c| c, device)?;
    let (m, _) = load_peft_adapter(base, adapter)?;
    let cfg_path = model.join("config.json");
    let base_cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&cfg_path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", cfg_path.display()))?,
    )
    .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", cfg_path.display()))?;
    let tied = write_hf_folder(
        out,
        &m,
        &folder.config.gpt_config(),
        Some(base_cfg),
        companion_files(model),
        adapter,
    )?;
    // Two factors (A, B) per adapted layer.
    let ranks = [m.wte.rank(), m.wpe.rank()]
        .into_iter()
        .chain(m.h.iter().flat_map(|b| {
            [
                b.attn.c_attn.rank(),
                b.attn.c_proj.rank(),
                b.mlp.c_fc.rank(),
                b.mlp.c_proj.rank(),
            ]
        }));
    let adapter_tensors = 2 * ranks.filter(|&r| r > 0).count();
    Ok(MergeReport {
        adapter_tensors,
        tied,
    })
}

/// Write `model` with its adapters merged in as a Hugging Face GPT-2 folder `dir`:
/// `model.safetensors` (`save_pretrained` layout), `config.json` (`base_config`, or one made from
/// `cfg`, with `tie_word_embeddings` as written) and the `extra` files, as one atomic folder.
/// Non-finite merged weights are an error naming `source` (PEFT's `safe_merge`). Returns whether
/// the head is tied to `wte`.
pub fn write_hf_folder(
    dir: &Path,
    model: &Gpt,
    cfg: &GptConfig,
    base_config: Option<serde_json::Value>,
    extra: Vec<(String, Vec<u8>)>,
    source: &Path,
) -> anyhow::Result<bool> {
    let (tensors, tied) = export::gpt2_state(model);
    if let Some((key, _, _)) = tensors
        .iter()
        .find(|(_, _, v)| v.iter().any(|x| !x.is_finite()))
    {
        anyhow::bail!(
            "{}: merging gives non-finite values in '{key}'; nothing written",
            source.display()
        );
    }
    let config = export::gpt2_config_json(cfg, base_config, tied);
    let mut files = vec![
        (
            "model.safetensors".to_string(),
            export::safetensors_bytes(&tensors)?,
        ),
        (
            "config.json".to_string(),
            serde_json::to_vec_pretty(&config)?,
        ),
    ];
    files.extend(extra);
    write_dir_atomic(dir, &files)?;
    Ok(tied)
}

/// The tokenizer and generation files of an HF folder (those present), to copy next to new weights.
pub fn companion_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ]
    .iter()
    .filter_map(|name| {
        std::fs::read(dir.join(name))
            .ok()
            .map(|b| (name.to_string(), b))
    })
    .collect()
}
