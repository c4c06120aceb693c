//! GPT-2 from a Hugging Face model folder (`config.json` + `model.safetensors`) and PEFT LoRA
//! adapters (`adapter_config.json` + `adapter_model.safetensors`).
//!
//! GPT-2's Conv1D stores weights `[in, out]`, the layout of Burn's Linear, so they load as they
//! are. Both key layouts load: `transformer.h.0…` (save_pretrained) and `h.0…` (the hub's `gpt2`
//! file; its `h.N.attn.bias` mask buffers are ignored). `lm_head` is tied to `wte`.

use crate::mingpt::{Gpt, GptConfig, LoraTargets};
use crate::pytorch::{LayerKeys, TensorReader, load_blocks, load_embedding, load_ln};
use burn::tensor::Device;
use lora_core::Scaling;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A model or adapter that cannot be used; the message names the file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct Gpt2Error {
    /// The file at fault.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

fn err(path: &Path, message: impl Into<String>) -> Gpt2Error {
    Gpt2Error {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Gpt2Error> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => err(path, "file not found"),
        _ => err(path, format!("cannot read: {e}")),
    })
}

fn default_true() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-5
}
fn default_pdrop() -> f64 {
    0.1
}
fn default_act() -> String {
    "gelu_new".into()
}

/// The fields of a transformers `GPT2Config` that shape the model.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2HfConfig {
    /// Embedding size.
    pub n_embd: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// Longest sequence.
    pub n_positions: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// MLP width (`null`: 4·n_embd).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Activation name.
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// Dropouts.
    #[serde(default = "default_pdrop")]
    pub embd_pdrop: f64,
    /// Dropouts.
    #[serde(default = "default_pdrop")]
    pub attn_pdrop: f64,
    /// Dropouts.
    #[serde(default = "default_pdrop")]
    pub resid_pdrop: f64,
    /// Output head tied to `wte`.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Scores scaled by 1/√head_dim.
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Scores also scaled by 1/(layer+1).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Cross-attention (encoder-decoder use).
    #[serde(default)]
    pub add_cross_attention: bool,
    /// End-of-text token.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

impl Gpt2HfConfig {
    /// Read and check `config.json`: unsupported settings are refused, naming the field.
    pub fn from_file(path: &Path) -> Result<Self, Gpt2Error> {
        Self::from_bytes(&read(path)?, path)
    }

    /// [`from_file`](Self::from_file) on the file's bytes (`path` names it in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, Gpt2Error> {
        let cfg: Self = serde_json::from_slice(bytes)
            .map_err(|e| err(path, format!("not a GPT-2 config: {e}")))?;
        let bad = |m: String| Err(err(path, m));
        if !matches!(
            cfg.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast"
        ) {
            return bad(format!(
                "activation_function '{}' is not supported (gelu_new, gelu_pytorch_tanh)",
                cfg.activation_function
            ));
        }
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return bad(format!(
                "n_embd {} is not divisible by n_head {}",
                cfg.n_embd, cfg.n_head
            ));
        }
        if cfg.n_layer == 0 || cfg.vocab_size == 0 || cfg.n_positions == 0 {
            return bad("n_layer, vocab_size and n_positions must be positive".into());
        }
        if let Some(inner) = cfg.n_inner.filter(|&i| i != 4 * cfg.n_embd) {
            return bad(format!(
                "n_inner {inner} is not supported (only 4·n_embd = {})",
                4 * cfg.n_embd
            ));
        }
        if !cfg.scale_attn_weights || cfg.scale_attn_by_inverse_layer_idx || cfg.add_cross_attention
        {
            return bad("scale_attn_weights false, scale_attn_by_inverse_layer_idx and add_cross_attention are not supported".into());
        }
        for (name, p) in [
            ("embd_pdrop", cfg.embd_pdrop),
            ("attn_pdrop", cfg.attn_pdrop),
            ("resid_pdrop", cfg.resid_pdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} {p} is not in [0, 1)"));
            }
        }
        Ok(cfg)
    }

    /// The model configuration (no LoRA yet).
    pub fn gpt_config(&self) -> GptConfig {
        GptConfig::new(
            self.n_layer,
            self.n_head,
            self.n_embd,
            self.vocab_size,
            self.n_positions,
        )
        .with_embd_pdrop(self.embd_pdrop)
        .with_attn_pdrop(self.attn_pdrop)
        .with_resid_pdrop(self.resid_pdrop)
        .with_layer_norm_eps(self.layer_norm_epsilon)
        .with_tie_word_embeddings(self.tie_word_embeddings)
        .with_lora_targets(LoraTargets::default())
    }
}

/// A Hugging Face GPT-2 folder.
#[derive(Debug, Clone)]
pub struct Gpt2Folder {
    /// The folder.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: Gpt2HfConfig,
}

impl Gpt2Folder {
    /// Open `dir` and read its `config.json`.
    pub fn open(dir: &Path) -> Result<Self, Gpt2Error> {
        if !dir.is_dir() {
            return Err(err(dir, "model folder not found"));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config: Gpt2HfConfig::from_file(&dir.join("config.json"))?,
        })
    }

    /// Load the weights into a model of [`Gpt2HfConfig::gpt_config`] (plus `dropout` overrides by
    /// the caller through `edit`). Missing, mis-shaped or mistyped tensors: one error listing each.
    pub fn load(
        &self,
        edit: impl FnOnce(GptConfig) -> GptConfig,
        device: &Device,
    ) -> Result<Gpt, Gpt2Error> {
        let path = self.dir.join("model.safetensors");
        let bytes = read(&path)?;
        let mut cfg = edit(self.config.gpt_config());
        cfg.lora_rank = 0; // adapters are added after the base weights are in
        let model = cfg.init(device);
        load_gpt2_weights(model, &bytes, &path)
    }
}

/// Load GPT-2 base weights (either key layout) from safetensors `bytes` into `model`.
pub fn load_gpt2_weights(model: Gpt, bytes: &[u8], path: &Path) -> Result<Gpt, Gpt2Error> {
    let shown = path.display().to_string();
    let device = model.ln_f.gamma.lazy_device();
    let probe = TensorReader::new(bytes, &shown, "", &device)
        .map_err(|e| err(path, TensorReader::reason(e)))?;
    let prefix = if probe.has("transformer.wte.weight") {
        "transformer."
    } else if probe.has("wte.weight") {
        ""
    } else {
        return Err(err(
            path,
            "no 'transformer.wte.weight' or 'wte.weight': not a GPT-2 checkpoint",
        ));
    };
    let has_head = probe.has("lm_head.weight");
    let mut r = TensorReader::new(bytes, &shown, prefix, &device)
        .map_err(|e| err(path, TensorReader::reason(e)))?;
    let conv1d = LayerKeys {
        transpose: false,
        lora_a: "",
        lora_b: "",
        base: true,
        lora: false,
    };
    let mut m = model;
    m.wte = load_embedding(&mut r, m.wte, "wte", true, false);
    m.wpe = load_embedding(&mut r, m.wpe, "wpe", true, false);
    m.h = load_blocks(&mut r, m.h, "", &conv1d);
    m.ln_f = load_ln(&mut r, m.ln_f, "ln_f");
    r.problems().map_err(|m| err(path, m))?;
    if let Some(head) = m.lm_head.take() {
        // An untied head lives outside the `transformer.` prefix.
        if !has_head {
            return Err(err(
                path,
                "missing tensor 'lm_head.weight' (tie_word_embeddings is false)",
            ));
        }
        let mut r = TensorReader::new(bytes, &shown, "", &device)
            .map_err(|e| err(path, TensorReader::reason(e)))?;
        let mut head = head;
        head.weight = r.load(head.weight, "lm_head.weight", true);
        r.problems().map_err(|m| err(path, m))?;
        m.lm_head = Some(head);
    }
    Ok(m)
}

/// What `adapter_config.json` says (PEFT's LoraConfig fields we use).
#[derive(Debug, Clone, Deserialize)]
pub struct PeftLoraConfig {
    /// Must be `LORA`.
    pub peft_type: String,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub lora_alpha: f64,
    /// Dropout on the adapter input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Scale by alpha/√r.
    #[serde(default)]
    pub use_rslora: bool,
    /// Module names (a list; a single string is a regex in PEFT, not supported).
    pub target_modules: serde_json::Value,
    /// Conv1D layout (must be true for GPT-2).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Only `none`.
    #[serde(default = "bias_none")]
    pub bias: String,
    /// Base model name.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

fn bias_none() -> String {
    "none".into()
}

impl PeftLoraConfig {
    /// Read and check `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, Gpt2Error> {
        Self::from_bytes(&read(path)?, path)
    }

    /// [`from_file`](Self::from_file) on the file's bytes (`path` names it in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, Gpt2Error> {
        let c: Self = serde_json::from_slice(bytes)
            .map_err(|e| err(path, format!("not a PEFT adapter config: {e}")))?;
        if c.peft_type != "LORA" {
            return Err(err(
                path,
                format!("peft_type '{}' is not supported (LORA)", c.peft_type),
            ));
        }
        if c.r == 0 {
            return Err(err(path, "r must be at least 1"));
        }
        if !(c.lora_alpha.is_finite() && c.lora_alpha > 0.0) {
            return Err(err(
                path,
                format!("lora_alpha {} must be positive", c.lora_alpha),
            ));
        }
        if !(0.0..1.0).contains(&c.lora_dropout) {
            return Err(err(
                path,
                format!("lora_dropout {} must be in [0, 1)", c.lora_dropout),
            ));
        }
        if c.bias != "none" {
            return Err(err(
                path,
                format!("bias '{}' is not supported (none)", c.bias),
            ));
        }
        Ok(c)
    }

    /// The targets as ours, or an error naming the field.
    pub fn targets(&self, path: &Path) -> Result<LoraTargets, Gpt2Error> {
        let names: Vec<String> = match &self.target_modules {
            serde_json::Value::Array(v) => v
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            serde_json::Value::String(s) if s == "all-linear" => vec![s.clone()],
            other => {
                return Err(err(
                    path,
                    format!("target_modules {other} is not supported (a list of module names)"),
                ));
            }
        };
        names
            .join(",")
            .parse()
            .map_err(|e: String| err(path, format!("target_modules: {e}")))
    }

    /// The scaling convention.
    pub fn scaling(&self) -> Scaling {
        if self.use_rslora {
            Scaling::RsLora
        } else {
            Scaling::AlphaOverRank
        }
    }
}

/// Add the adapter in `dir` to `model` (base weights already loaded): adapters are created on the
/// targeted layers and filled from `adapter_model.safetensors`. Unknown keys, missing keys and
/// shape mismatches are errors naming the key and both shapes.
pub fn load_peft_adapter(model: Gpt, dir: &Path) -> Result<(Gpt, PeftLoraConfig), Gpt2Error> {
    let cfg_path = dir.join("adapter_config.json");
    // The config's errors first: they are the more useful ones.
    let cfg = PeftLoraConfig::from_file(&cfg_path)?;
    let path = dir.join("adapter_model.safetensors");
    let bytes = read(&path)?;
    add_peft_adapter(model, cfg, &cfg_path, (&bytes, &path))
}

/// [`load_peft_adapter`] on the bytes of `adapter_config.json` and `adapter_model.safetensors`
/// (each with the path that names it in errors).
pub fn load_peft_adapter_bytes(
    model: Gpt,
    (cfg_bytes, cfg_path): (&[u8], &Path),
    weights: (&[u8], &Path),
) -> Result<(Gpt, PeftLoraConfig), Gpt2Error> {
    let cfg = PeftLoraConfig::from_bytes(cfg_bytes, cfg_path)?;
    add_peft_adapter(model, cfg, cfg_path, weights)
}

/// Add the adapter `cfg` describes (read from `cfg_path`) with the factors in `bytes` (`path`).
fn add_peft_adapter(
    model: Gpt,
    cfg: PeftLoraConfig,
    cfg_path: &Path,
    (bytes, path): (&[u8], &Path),
) -> Result<(Gpt, PeftLoraConfig), Gpt2Error> {
    let targets = cfg.targets(cfg_path)?;
    if !cfg.fan_in_fan_out && targets.any_block() {
        return Err(err(
            cfg_path,
            "fan_in_fan_out is false, but GPT-2's Conv1D layers need it true",
        ));
    }
    // The smallest side of a targeted weight bounds the rank (and the memory A and B take).
    let [vocab, n_embd] = model.wte.weight.lazy_shape().dims::<2>();
    let n_pos = model.wpe.weight.lazy_shape().dims::<2>()[0];
    let side = [
        (targets.wte, vocab.min(n_embd)),
        (targets.wpe, n_pos.min(n_embd)),
        (targets.any_block(), n_embd),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, s)| s)
    .min()
    .unwrap_or(n_embd);
    if cfg.r > side {
        return Err(err(
            cfg_path,
            format!(
                "r {} is larger than min(in, out) = {side} of the targeted layers",
                cfg.r
            ),
        ));
    }
    let model = model.add_lora(
        targets,
        cfg.r,
        cfg.lora_alpha,
        cfg.lora_dropout,
        cfg.scaling(),
    );
    let shown = path.display().to_string();
    let device = model.ln_f.gamma.lazy_device();
    let mut r = TensorReader::new(bytes, &shown, "base_model.model.transformer.", &device)
        .map_err(|e| err(path, TensorReader::reason(e)))?;
    let peft = LayerKeys {
        transpose: false,
        lora_a: "lora_A.weight",
        lora_b: "lora_B.weight",
        base: false,
        lora: true,
    };
    let mut expected: Vec<String> = vec![];
    let mut m = model;
    let mut note = |on: bool, key: String, emb: bool| {
        if on {
            let (a, b) = if emb {
                ("lora_embedding_A", "lora_embedding_B")
            } else {
                ("lora_A.weight", "lora_B.weight")
            };
            expected.push(format!("base_model.model.transformer.{key}.{a}"));
            expected.push(format!("base_model.model.transformer.{key}.{b}"));
        }
    };
    note(targets.wte, "wte".into(), true);
    note(targets.wpe, "wpe".into(), true);
    for i in 0..m.h.len() {
        note(targets.c_attn, format!("h.{i}.attn.c_attn"), false);
        note(targets.attn_c_proj, format!("h.{i}.attn.c_proj"), false);
        note(targets.c_fc, format!("h.{i}.mlp.c_fc"), false);
        note(targets.mlp_c_proj, format!("h.{i}.mlp.c_proj"), false);
    }
    for key in r.keys() {
        if !expected.contains(&key) {
            r.problem(format!(
                "unexpected tensor '{key}' (not a LoRA factor of target_modules {targets})"
            ));
        }
    }
    m.wte = load_embedding(&mut r, m.wte, "wte", false, true);
    m.wpe = load_embedding(&mut r, m.wpe, "wpe", false, true);
    m.h = load_blocks(&mut r, m.h, "", &peft);
    r.problems().map_err(|m| err(path, m))?;
    Ok((m, cfg))
}
