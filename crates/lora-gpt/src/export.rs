//! Writing GPT-2 in Hugging Face's formats: the `save_pretrained` state dict (merged models, full
//! fine-tunes) and PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`).
//! Functions return bytes; the caller writes them (atomically).

use crate::mingpt::{Block, Gpt, GptConfig};
use burn::tensor::Tensor;
use lora_core::{LoraEmbedding, LoraLinear, LoraMerge, Scaling};

/// A named f32 tensor: key, shape, values (row-major).
pub use lora_core::utils::NamedValues as Named;

fn named<const D: usize>(key: String, t: Tensor<D>) -> Named {
    let shape = t.dims().to_vec();
    let values = t
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data");
    (key, shape, values)
}

/// safetensors bytes of `tensors` with `{"format": "pt"}` metadata (transformers requires it).
pub fn safetensors_bytes(tensors: &[Named]) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    lora_core::utils::safetensors_bytes(tensors, &[])
}

/// The Hugging Face GPT-2 state dict of `model` with every adapter merged in (`save_pretrained`
/// layout: `transformer.h.0.attn.c_attn.weight` `[in, out]` …; `lm_head.weight` `[vocab, n_embd]`
/// only when the head is untied). Returns the tensors and whether the head is tied.
pub fn gpt2_state(model: &Gpt) -> (Vec<Named>, bool) {
    let m = model.clone().merge();
    let mut out = vec![
        named("transformer.wte.weight".into(), m.wte.weight.val()),
        named("transformer.wpe.weight".into(), m.wpe.weight.val()),
    ];
    let ln = |out: &mut Vec<Named>, key: String, l: &burn::nn::LayerNorm| {
        out.push(named(format!("{key}.weight"), l.gamma.val()));
        if let Some(b) = &l.beta {
            out.push(named(format!("{key}.bias"), b.val()));
        }
    };
    let lin = |out: &mut Vec<Named>, key: String, l: &LoraLinear| {
        out.push(named(format!("{key}.weight"), l.weight.val()));
        if let Some(b) = &l.bias {
            out.push(named(format!("{key}.bias"), b.val()));
        }
    };
    for (i, b) in m.h.iter().enumerate() {
        let p = format!("transformer.h.{i}");
        ln(&mut out, format!("{p}.ln_1"), &b.ln_1);
        lin(&mut out, format!("{p}.attn.c_attn"), &b.attn.c_attn);
        lin(&mut out, format!("{p}.attn.c_proj"), &b.attn.c_proj);
        ln(&mut out, format!("{p}.ln_2"), &b.ln_2);
        lin(&mut out, format!("{p}.mlp.c_fc"), &b.mlp.c_fc);
        lin(&mut out, format!("{p}.mlp.c_proj"), &b.mlp.c_proj);
    }
    ln(&mut out, "transformer.ln_f".into(), &m.ln_f);
    let tied = m.lm_head.is_none();
    if let Some(head) = &m.lm_head {
        out.push(named(
            "lm_head.weight".into(),
            head.weight.val().transpose(),
        ));
    }
    (out, tied)
}

/// PEFT's tensors for the adapters of `model` (un-merged values): `base_model.model.transformer.
/// h.0.attn.c_attn.lora_A.weight` `[r, in]`, `…lora_B.weight` `[out, r]`, embeddings
/// `…wte.lora_embedding_A` `[r, vocab]` / `…lora_embedding_B` `[n_embd, r]`.
pub fn peft_adapter_tensors(model: &Gpt) -> Vec<Named> {
    let m = model.clone().unmerge();
    let p = "base_model.model.transformer";
    let mut out = vec![];
    let emb = |out: &mut Vec<Named>, key: &str, e: &LoraEmbedding| {
        if let (Some(a), Some(b)) = (&e.lora_a, &e.lora_b) {
            out.push(named(format!("{p}.{key}.lora_embedding_A"), a.val()));
            out.push(named(format!("{p}.{key}.lora_embedding_B"), b.val()));
        }
    };
    let lin = |out: &mut Vec<Named>, key: String, l: &LoraLinear| {
        if let (Some(a), Some(b)) = (&l.lora_a, &l.lora_b) {
            out.push(named(format!("{p}.{key}.lora_A.weight"), a.val()));
            out.push(named(format!("{p}.{key}.lora_B.weight"), b.val()));
        }
    };
    emb(&mut out, "wte", &m.wte);
    emb(&mut out, "wpe", &m.wpe);
    for (i, b) in m.h.iter().enumerate() {
        let Block { attn, mlp, .. } = b;
        lin(&mut out, format!("h.{i}.attn.c_attn"), &attn.c_attn);
        lin(&mut out, format!("h.{i}.attn.c_proj"), &attn.c_proj);
        lin(&mut out, format!("h.{i}.mlp.c_fc"), &mlp.c_fc);
        lin(&mut out, format!("h.{i}.mlp.c_proj"), &mlp.c_proj);
    }
    out
}

/// What an adapter was trained with, for `adapter_config.json`.
#[derive(Debug, Clone)]
pub struct AdapterSpec {
    /// Rank.
    pub r: usize,
    /// Our alpha.
    pub alpha: f64,
    /// Our scaling convention.
    pub scaling: Scaling,
    /// Dropout on the adapter input.
    pub dropout: f64,
    /// PEFT module names (`c_attn`, `c_proj`, `c_fc`, `wte`, `wpe`).
    pub target_modules: Vec<String>,
    /// The base model's folder or name.
    pub base_model: Option<String>,
}

/// PEFT's `adapter_config.json` for `spec`. PEFT scales by `lora_alpha / r` (or `/ √r` with
/// rsLoRA), so our `alpha` convention is written as `lora_alpha = alpha · r`.
pub fn peft_adapter_config(spec: &AdapterSpec) -> serde_json::Value {
    let (lora_alpha, use_rslora) = match spec.scaling {
        Scaling::AlphaOverRank => (spec.alpha, false),
        Scaling::Alpha => (spec.alpha * spec.r as f64, false),
        Scaling::RsLora => (spec.alpha, true),
    };
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.r,
        "lora_alpha": lora_alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": use_rslora,
        "target_modules": spec.target_modules,
        "fan_in_fan_out": true,
        "bias": "none",
        "base_model_name_or_path": spec.base_model,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": null,
    })
}

/// A `config.json`: `base` (the source folder's config) or one made from `cfg`, with the head's
/// tying as in `tied`.
pub fn gpt2_config_json(
    cfg: &GptConfig,
    base: Option<serde_json::Value>,
    tied: bool,
) -> serde_json::Value {
    let mut json = base.unwrap_or_else(|| {
        serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_positions": cfg.block_size,
            "n_ctx": cfg.block_size,
            "n_inner": null,
            "layer_norm_epsilon": cfg.layer_norm_eps,
            "embd_pdrop": cfg.embd_pdrop,
            "attn_pdrop": cfg.attn_pdrop,
            "resid_pdrop": cfg.resid_pdrop,
            "initializer_range": 0.02,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        })
    });
    json["tie_word_embeddings"] = serde_json::Value::Bool(tied);
    json
}
