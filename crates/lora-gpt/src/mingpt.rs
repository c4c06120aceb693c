//! minGPT with LoRA (karpathy/minGPT `model.py` + the exercise's `GPT_LoRA`), in one file.
//!
//! Names follow minGPT: `wte`, `wpe`, `h[i].attn.c_attn`, `h[i].attn.c_proj`, `h[i].mlp.c_fc`,
//! `h[i].mlp.c_proj`, `ln_f`, `lm_head`. Every Linear but `lm_head` is a [`LoraLinear`] and both
//! embeddings are [`LoraEmbedding`]s; layers not in [`LoraTargets`] get rank 0 (plain layers).

use crate::fused;
use crate::norm_lora::layer_norm_lora_linear;
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{
    Dropout, DropoutConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use lora_core::layers::linear;
use lora_core::{LoraEmbedding, LoraLinear, LoraMerge, Scaling, cast_to, dropout_folded};
use serde::{Deserialize, Serialize};

/// Which layers carry LoRA adapters, by module name (PEFT's `target_modules` for GPT-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoraTargets {
    /// `attn.c_attn`.
    pub c_attn: bool,
    /// `attn.c_proj`.
    pub attn_c_proj: bool,
    /// `mlp.c_fc`.
    pub c_fc: bool,
    /// `mlp.c_proj`.
    pub mlp_c_proj: bool,
    /// Token embedding `wte`.
    pub wte: bool,
    /// Position embedding `wpe`.
    pub wpe: bool,
}

impl LoraTargets {
    /// Whether any layer inside the blocks (`c_attn`, `c_proj`, `c_fc`) is targeted.
    pub fn any_block(&self) -> bool {
        self.c_attn || self.attn_c_proj || self.c_fc || self.mlp_c_proj
    }

    /// `attn.c_attn` and `attn.c_proj`: the exercise's targets.
    pub const ATTN: Self = Self {
        c_attn: true,
        attn_c_proj: true,
        c_fc: false,
        mlp_c_proj: false,
        wte: false,
        wpe: false,
    };

    /// Whether no layer is targeted.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// PEFT `target_modules` names: `c_attn`, `c_proj` (both), `c_fc`, `wte`, `wpe`,
    /// or `attn.c_proj` / `mlp.c_proj` when only one of the two is targeted.
    pub fn module_names(&self) -> Vec<String> {
        let mut v = vec![];
        let mut push = |on: bool, name: &str| {
            if on {
                v.push(name.to_string())
            }
        };
        push(self.c_attn, "c_attn");
        match (self.attn_c_proj, self.mlp_c_proj) {
            (true, true) => push(true, "c_proj"),
            (a, m) => {
                push(a, "attn.c_proj");
                push(m, "mlp.c_proj");
            }
        }
        push(self.c_fc, "c_fc");
        push(self.wte, "wte");
        push(self.wpe, "wpe");
        v
    }
}

impl std::str::FromStr for LoraTargets {
    type Err = String;

    /// Comma-separated names: `attn` (c_attn + attn.c_proj), `mlp` (c_fc + mlp.c_proj), `c_attn`,
    /// `c_proj` (attention and MLP, as PEFT matches it), `attn.c_proj`, `mlp.c_proj`, `c_fc`, `wte`,
    /// `wpe`, `all-linear` (every Linear / Conv1D but the output head).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut t = Self::default();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "attn" => (t.c_attn, t.attn_c_proj) = (true, true),
                "mlp" => (t.c_fc, t.mlp_c_proj) = (true, true),
                "c_attn" => t.c_attn = true,
                "c_proj" => (t.attn_c_proj, t.mlp_c_proj) = (true, true),
                "attn.c_proj" => t.attn_c_proj = true,
                "mlp.c_proj" => t.mlp_c_proj = true,
                "c_fc" => t.c_fc = true,
                "wte" => t.wte = true,
                "wpe" => t.wpe = true,
                "all-linear" => {
                    (t.c_attn, t.attn_c_proj, t.c_fc, t.mlp_c_proj) = (true, true, true, true)
                }
                other => {
                    return Err(format!(
                        "unknown LoRA target '{other}': expected attn, mlp, c_attn, c_proj, attn.c_proj, mlp.c_proj, c_fc, wte, wpe or all-linear"
                    ));
                }
            }
        }
        if t.is_empty() {
            return Err(format!("no LoRA target in '{s}'"));
        }
        Ok(t)
    }
}

impl std::fmt::Display for LoraTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.module_names().join(","))
    }
}

/// minGPT configuration (`GPT.get_default_config()` plus the exercise's LoRA fields).
#[derive(Config, Debug)]
pub struct GptConfig {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Embedding size.
    pub n_embd: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence.
    pub block_size: usize,
    /// Dropout after the embeddings.
    #[config(default = 0.1)]
    pub embd_pdrop: f64,
    /// Dropout on residual branches.
    #[config(default = 0.1)]
    pub resid_pdrop: f64,
    /// Dropout on attention weights.
    #[config(default = 0.1)]
    pub attn_pdrop: f64,
    /// LoRA rank (0: no adapters).
    #[config(default = 0)]
    pub lora_rank: usize,
    /// LoRA alpha.
    #[config(default = 1.0)]
    pub lora_alpha: f64,
    /// Dropout on the LoRA input.
    #[config(default = 0.0)]
    pub lora_dropout: f64,
    /// LoRA scaling convention.
    #[config(default = "Scaling::AlphaOverRank")]
    pub lora_scaling: Scaling,
    /// Layers that get adapters.
    #[config(default = "LoraTargets::ATTN")]
    pub lora_targets: LoraTargets,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Output head shares the token embedding (GPT-2); minGPT has its own `lm_head`.
    #[config(default = false)]
    pub tie_word_embeddings: bool,
}

/// minGPT's named sizes: `(n_layer, n_head, n_embd)`.
pub fn model_type_dims(name: &str) -> Option<(usize, usize, usize)> {
    Some(match name {
        "openai-gpt" => (12, 12, 768),
        "gpt2" => (12, 12, 768),
        "gpt2-medium" => (24, 16, 1024),
        "gpt2-large" => (36, 20, 1280),
        "gpt2-xl" => (48, 25, 1600),
        "gopher-44m" => (8, 16, 512),
        "gpt-mini" => (6, 6, 192),
        "gpt-micro" => (4, 4, 128),
        "gpt-nano" => (3, 3, 48),
        _ => return None,
    })
}

/// All names [`model_type_dims`] knows.
pub const MODEL_TYPES: [&str; 9] = [
    "openai-gpt",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "gopher-44m",
    "gpt-mini",
    "gpt-micro",
    "gpt-nano",
];

impl GptConfig {
    /// A config from minGPT's model type name (`gpt-nano`, …, `gpt2-xl`).
    pub fn from_model_type(
        name: &str,
        vocab_size: usize,
        block_size: usize,
    ) -> Result<Self, String> {
        let (l, h, e) = model_type_dims(name).ok_or_else(|| {
            format!(
                "unknown model type '{name}' (expected one of {})",
                MODEL_TYPES.join(", ")
            )
        })?;
        Ok(Self::new(l, h, e, vocab_size, block_size))
    }

    /// The largest buffers of a training step on `rows` tokens, (name, bytes): the token table
    /// `[vocab, n_embd]` (f32) and the MLP's hidden activations `[rows, 4·n_embd]` of `elem`
    /// bytes (what [`lora_core::check_buffers`] checks against a device's binding limit).
    pub fn largest_buffers(&self, rows: usize, elem: usize) -> Vec<(String, u64)> {
        let (v, e) = (self.vocab_size, self.n_embd);
        vec![
            (
                format!("the token table `wte` [{v}, {e}] (f32)"),
                (v * e * 4) as u64,
            ),
            (
                format!("the MLP's hidden activations [{rows}, {}]", 4 * e),
                (rows * 4 * e * elem) as u64,
            ),
        ]
    }

    fn linear(
        &self,
        d_in: usize,
        d_out: usize,
        std: f64,
        lora: bool,
        device: &Device,
    ) -> LoraLinear {
        let weight = Initializer::Normal { mean: 0.0, std }.init([d_in, d_out], device);
        let bias = Initializer::Zeros.init([d_out], device);
        let rank = if lora { self.lora_rank } else { 0 };
        LoraLinear::from_base(
            weight,
            Some(bias),
            rank,
            self.lora_alpha,
            self.lora_dropout,
            self.lora_scaling,
        )
    }

    fn embedding(&self, n: usize, lora: bool, device: &Device) -> LoraEmbedding {
        let weight = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        }
        .init([n, self.n_embd], device);
        let rank = if lora { self.lora_rank } else { 0 };
        LoraEmbedding::from_base(weight, rank, self.lora_alpha, self.lora_scaling)
    }

    /// Build the model with minGPT's init: Linear / Embedding N(0, 0.02), both `c_proj` N(0,
    /// 0.02/√(2·n_layer)), zero biases, LayerNorm (1, 0), `lm_head` without bias; LoRA A
    /// Kaiming-uniform, B zeros.
    pub fn init(&self, device: &Device) -> Gpt {
        assert!(
            self.n_embd.is_multiple_of(self.n_head),
            "n_embd must be divisible by n_head"
        );
        let (e, t) = (self.n_embd, self.lora_targets);
        let proj_std = 0.02 / (2.0 * self.n_layer as f64).sqrt();
        let h = (0..self.n_layer)
            .map(|_| Block {
                ln_1: LayerNormConfig::new(e)
                    .with_epsilon(self.layer_norm_eps)
                    .init(device),
                attn: CausalSelfAttention {
                    c_attn: self.linear(e, 3 * e, 0.02, t.c_attn, device),
                    c_proj: self.linear(e, e, proj_std, t.attn_c_proj, device),
                    attn_dropout: DropoutConfig::new(self.attn_pdrop).init(),
                    resid_dropout: DropoutConfig::new(self.resid_pdrop).init(),
                    n_head: self.n_head,
                },
                ln_2: LayerNormConfig::new(e)
                    .with_epsilon(self.layer_norm_eps)
                    .init(device),
                mlp: Mlp {
                    c_fc: self.linear(e, 4 * e, 0.02, t.c_fc, device),
                    c_proj: self.linear(4 * e, e, proj_std, t.mlp_c_proj, device),
                    dropout: DropoutConfig::new(self.resid_pdrop).init(),
                },
                layer_norm_eps: self.layer_norm_eps,
            })
            .collect();
        let lm_head = (!self.tie_word_embeddings).then(|| {
            LinearConfig::new(e, self.vocab_size)
                .with_bias(false)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device)
        });
        Gpt {
            wte: self.embedding(self.vocab_size, t.wte, device),
            wpe: self.embedding(self.block_size, t.wpe, device),
            drop: DropoutConfig::new(self.embd_pdrop).init(),
            h,
            ln_f: LayerNormConfig::new(e)
                .with_epsilon(self.layer_norm_eps)
                .init(device),
            layer_norm_eps: self.layer_norm_eps,
            lm_head,
            head_untied_by_merge: false,
            f16: false,
            block_size: self.block_size,
        }
    }
}

/// Score of a masked (future) position (true in the mask: above the diagonal), as PyTorch's -inf.
const MASKED: f32 = f32::NEG_INFINITY;

/// Causal multi-head self-attention.
#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    /// `[n_embd] -> [3·n_embd]` (q, k, v).
    pub c_attn: LoraLinear,
    /// `[n_embd] -> [n_embd]`.
    pub c_proj: LoraLinear,
    /// Dropout on attention weights.
    pub attn_dropout: Dropout,
    /// Dropout on the output.
    pub resid_dropout: Dropout,
    /// Number of heads.
    pub n_head: usize,
}

/// The causal bias `[1, 1, seq, seq]` in `dt`: 0 on and below the diagonal, −∞ above (future
/// positions). Built once per forward pass and shared by every layer.
pub fn causal_bias(t: usize, device: &Device, dt: DType) -> Tensor<4> {
    Tensor::<2>::zeros([t, t], (device, dt))
        .mask_fill(Tensor::<2, Bool>::tril_mask([t, t], 0, device), MASKED)
        .reshape([1, 1, t, t])
}

impl CausalSelfAttention {
    /// `[batch, seq, n_embd] -> [batch, seq, n_embd]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let t = x.dims()[1];
        let bias = causal_bias(t, &x.device(), x.dtype());
        self.forward_biased(x, bias)
    }

    /// [`forward`](Self::forward) with the [`causal_bias`] given (in c_attn's output dtype).
    pub fn forward_biased(&self, x: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        self.attend(self.c_attn.forward(x), bias)
    }

    /// The attention after `c_attn`: its output `qkv [batch, seq, 3·n_embd]`, the
    /// [`causal_bias`] -> `[batch, seq, n_embd]`.
    pub fn attend(&self, qkv: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        let [b, t, c3] = qkv.dims();
        let c = c3 / 3;
        let (nh, hs) = (self.n_head, c / self.n_head);
        let device = qkv.device();
        let training = self.attn_dropout.training.is_enabled() && device.is_autodiff();
        let dt = qkv.dtype();
        // Training keeps qkv (and the dropout mask) in one autodiff node, not the scores.
        let keep = match training {
            true => fused::attention_dropout(&self.attn_dropout, [b, nh, t, t], &device, dt),
            false => None,
        };
        // Inference too: Burn's fused `attention` op on wgpu (f32) runs a flash kernel that took
        // ~20 ms per layer at 1024 tokens on an H100 in about half the passes (stalls of 230 ms per
        // GPT-2 forward); ours (`flash.rs`, heads of 64) made the whole forward 30.2 -> 12.8 ms.
        let y = fused::causal_attention(qkv, bias, keep, nh, 1.0 / (hs as f64).sqrt());
        let y = y.swap_dims(1, 2).reshape([b, t, c]);
        dropout_folded(&self.resid_dropout, self.c_proj.forward(y))
    }
}

/// The MLP of a block: `c_fc`, GELU (tanh), `c_proj`, dropout.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `[n_embd] -> [4·n_embd]`.
    pub c_fc: LoraLinear,
    /// `[4·n_embd] -> [n_embd]`.
    pub c_proj: LoraLinear,
    /// Dropout on the output.
    pub dropout: Dropout,
}

/// GELU, tanh approximation (minGPT's `NewGELU`, GPT-2's `gelu_new`):
/// `0.5·x·(1 + tanh(u)) = x·sigmoid(2u)`, `u = √(2/π)·(x + 0.044715·x³)`.
///
/// Written with `sigmoid` because it is the same function and CPU backends evaluate it several
/// times faster than `tanh`; one fused op ([`fused::gelu_tanh`]) that keeps only `x` for the
/// backward pass.
pub fn new_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    fused::gelu_tanh(x)
}

impl Mlp {
    /// `[batch, seq, n_embd] -> [batch, seq, n_embd]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.activate(self.c_fc.forward(x))
    }

    /// The MLP after `c_fc`: its output `[batch, seq, 4·n_embd]` -> `[batch, seq, n_embd]`.
    pub fn activate(&self, h: Tensor<3>) -> Tensor<3> {
        dropout_folded(&self.dropout, self.c_proj.forward(new_gelu(h)))
    }
}

/// Pre-norm transformer block.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention.
    pub ln_1: LayerNorm,
    /// Attention.
    pub attn: CausalSelfAttention,
    /// Norm before the MLP.
    pub ln_2: LayerNorm,
    /// MLP.
    pub mlp: Mlp,
    /// The norms' epsilon (for the fused norm on GPUs; Burn's LayerNorm keeps its own private).
    pub layer_norm_eps: f64,
}

impl Block {
    /// `[batch, seq, n_embd] -> [batch, seq, n_embd]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let t = x.dims()[1];
        let bias = causal_bias(t, &x.device(), x.dtype());
        self.forward_biased(x, bias)
    }

    /// [`forward`](Self::forward) with the attention's [`causal_bias`] given (in x's dtype).
    pub fn forward_biased(&self, x: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        let eps = self.layer_norm_eps;
        let qkv = norm_linear(&self.ln_1, eps, x.clone(), &self.attn.c_attn);
        let x = x + self.attn.attend(qkv, bias);
        let h = norm_linear(&self.ln_2, eps, x.clone(), &self.mlp.c_fc);
        x + self.mlp.activate(h)
    }
}

/// `lin(ln(x))` (`ln`'s epsilon `eps`). On cubecl devices (GPUs), with an unmerged adapter, one
/// op ([`layer_norm_lora_linear`]): training keeps x for both, not x and `ln(x)`.
fn norm_linear(ln: &LayerNorm, eps: f64, x: Tensor<3>, lin: &LoraLinear) -> Tensor<3> {
    let device = x.device();
    if let Some(beta) = &ln.beta
        && lora_core::dropout::on_cubecl(&device)
        && let Some(parts) = lin.fused_parts(x.dtype(), &device)
    {
        return layer_norm_lora_linear(x, ln.gamma.val(), beta.val(), eps, parts);
    }
    lin.forward(norm(ln, eps, x))
}

/// `ln(x)` computed in f32, returned in `x`'s dtype; on cubecl devices (GPUs) one fused op
/// ([`fused::layer_norm`]: a row kernel each way, keeping x and two floats per row for the
/// backward pass), elsewhere Burn's LayerNorm between two casts. `eps`: the norm's epsilon.
fn norm(ln: &LayerNorm, eps: f64, x: Tensor<3>) -> Tensor<3> {
    match &ln.beta {
        Some(beta) if lora_core::dropout::on_cubecl(&x.device()) => {
            fused::layer_norm(x, ln.gamma.val(), beta.val(), eps)
        }
        _ => {
            let dtype = x.dtype();
            cast_to(ln.forward(cast_to(x, DType::F32)), dtype)
        }
    }
}

/// minGPT's GPT with LoRA layers.
#[derive(Module, Debug)]
pub struct Gpt {
    /// Token embedding `[vocab_size, n_embd]`.
    pub wte: LoraEmbedding,
    /// Position embedding `[block_size, n_embd]`.
    pub wpe: LoraEmbedding,
    /// Dropout after the embeddings.
    pub drop: Dropout,
    /// Transformer blocks.
    pub h: Vec<Block>,
    /// Final norm.
    pub ln_f: LayerNorm,
    /// The final norm's epsilon.
    pub layer_norm_eps: f64,
    /// Output head `[n_embd, vocab_size]`, no bias; `None`: tied to `wte`'s base table.
    pub lm_head: Option<Linear>,
    /// `merge` gave a tied head its own copy of the base table (`wte` has LoRA); `unmerge` re-ties.
    pub head_untied_by_merge: bool,
    /// Half-precision compute: the blocks and the head run in f16 (weights are cast on use, so
    /// trained weights, their gradients and optimizer state stay f32); norms and the loss in f32.
    /// See [`half_precision`](Self::half_precision).
    pub f16: bool,
    /// Longest sequence.
    pub block_size: usize,
}

/// The targets of next-token prediction for `idx [batch, seq]`: `idx` shifted left by one, −1
/// (ignored) at the last position.
pub fn next_token_targets(idx: Tensor<2, Int>) -> Tensor<2, Int> {
    let [b, t] = idx.dims();
    let last = Tensor::<2, Int>::full([b, 1], -1, &idx.device());
    Tensor::cat(vec![idx.narrow(1, 1, t - 1), last], 1)
}

/// Mean cross-entropy of `logits [batch, seq, vocab]` against `targets [batch, seq]`, ignoring
/// targets < 0 (PyTorch's `ignore_index=-1`).
pub fn cross_entropy_ignore(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let targets = targets.reshape([b * t, 1]);
    let keep = targets.clone().greater_equal_elem(0).float();
    // One autodiff node: keeps the logits, not log-softmax's `[b·t, vocab]` intermediates.
    let logits = cast_to(logits.reshape([b * t, v]), DType::F32);
    let nll = fused::nll(logits, targets.clamp_min(0));
    (nll * keep.clone()).sum() / keep.sum()
}

impl Gpt {
    /// Half-precision compute ([`f16`](Self::f16)) with the frozen linears' base weights kept in
    /// f16 ([`LoraLinear::store_frozen_base_in`]): the same values (they were cast on every use),
    /// without their f32 copies and per-step casts. Trained weights stay f32; embeddings, norms
    /// and a tied head read f32 tables as before. Call it on the training model.
    pub fn half_precision(mut self) -> Self {
        self.f16 = true;
        self.h = self
            .h
            .into_iter()
            .map(|mut block| {
                let half = |l: LoraLinear| l.store_frozen_base_in(DType::F16);
                block.attn.c_attn = half(block.attn.c_attn);
                block.attn.c_proj = half(block.attn.c_proj);
                block.mlp.c_fc = half(block.mlp.c_fc);
                block.mlp.c_proj = half(block.mlp.c_proj);
                block
            })
            .collect();
        self
    }

    /// `idx [batch, seq]` -> logits `[batch, seq, vocab]`.
    pub fn forward(&self, idx: Tensor<2, Int>) -> Tensor<3> {
        self.head(self.hidden(idx))
    }

    /// `idx [batch, seq]` -> the final norm's output `[batch, seq, n_embd]` (what [`head`](Self::head)
    /// turns into logits).
    pub fn hidden(&self, idx: Tensor<2, Int>) -> Tensor<3> {
        let [_, t] = idx.dims();
        assert!(
            t <= self.block_size,
            "Cannot forward sequence of length {t}, block size is only {}",
            self.block_size
        );
        let device = idx.device();
        // The dropouts' seeds in one draw on GPUs.
        lora_core::dropout::with_seed_pool(&device, || {
            let pos = Tensor::<1, Int>::arange(0..t as i64, &device).unsqueeze::<2>();
            let x = dropout_folded(&self.drop, self.wte.forward(idx) + self.wpe.forward(pos));
            let x = if self.f16 { x.cast(DType::F16) } else { x };
            // One causal bias for all layers (built per layer, it was ~0.1 ms of GPU time each).
            let bias = causal_bias(t, &x.device(), x.dtype());
            let x = self
                .h
                .iter()
                .fold(x, |x, block| block.forward_biased(x, bias.clone()));
            norm(&self.ln_f, self.layer_norm_eps, x)
        })
    }

    /// `idx [batch, seq]` -> the last position's logits `[batch, vocab]`, the head run on that row
    /// alone (what a generation step needs).
    pub fn last_logits(&self, idx: Tensor<2, Int>) -> Tensor<2> {
        let x = self.hidden(idx);
        let [b, t, _] = x.dims();
        let logits = self.head(x.narrow(1, t - 1, 1));
        let vocab = logits.dims()[2];
        logits.reshape([b, vocab])
    }

    /// Output head: `[batch, seq, n_embd] -> [batch, seq, vocab]`.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let (w, b) = self.head_params(x.dtype());
        linear(x, w, b)
    }

    /// The head's weight `[n_embd, vocab]` and bias in `dt`. A tied head uses `wte`'s base table,
    /// without its LoRA delta, as PEFT's unmerged model does.
    fn head_params(&self, dt: DType) -> (Tensor<2>, Option<Tensor<1>>) {
        match &self.lm_head {
            Some(head) => (
                cast_to(head.weight.val(), dt),
                head.bias.as_ref().map(|b| cast_to(b.val(), dt)),
            ),
            None => (cast_to(self.wte.weight.val(), dt).transpose(), None),
        }
    }

    /// Logits and the mean cross-entropy against `targets [batch, seq]` (−1 = ignored).
    pub fn forward_loss(
        &self,
        idx: Tensor<2, Int>,
        targets: Tensor<2, Int>,
    ) -> (Tensor<3>, Tensor<1>) {
        let logits = self.forward(idx);
        let loss = cross_entropy_ignore(logits.clone(), targets);
        (logits, loss)
    }

    /// The mean cross-entropy of [`forward_loss`](Self::forward_loss) without the
    /// `[batch, seq, vocab]` logits: the head and the loss run as one op over at most four chunks
    /// of rows ([`fused::linear_cross_entropy`]), which is what training and validation need.
    pub fn loss(&self, idx: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        self.scaled_loss(idx, targets, 1.0)
    }

    /// `scale` times [`loss`](Self::loss), the loss a loss scaler differentiates: the fused head
    /// takes the scale into the gradients it computes in the forward pass
    /// ([`fused::scaled_linear_cross_entropy`]; in f16, scaling its result instead flushes most
    /// of the logits' gradient to zero).
    pub fn scaled_loss(
        &self,
        idx: Tensor<2, Int>,
        targets: Tensor<2, Int>,
        scale: f64,
    ) -> Tensor<1> {
        let x = self.hidden(idx);
        let [b, t, d] = x.dims();
        match self.head_params(x.dtype()) {
            // The op has no bias term: a biased head takes the logits route.
            (w, Some(bias)) => {
                let loss = cross_entropy_ignore(linear(x, w, Some(bias)), targets);
                match scale == 1.0 {
                    true => loss,
                    false => loss.mul_scalar(scale),
                }
            }
            (w, None) => fused::scaled_linear_cross_entropy(
                x.reshape([b * t, d]),
                w,
                targets.reshape([b * t]),
                scale,
            ),
        }
    }

    /// [`causal_lm_loss`](Self::causal_lm_loss)'s value through [`loss`](Self::loss): no logits.
    pub fn causal_loss(&self, idx: Tensor<2, Int>) -> Tensor<1> {
        let targets = next_token_targets(idx.clone());
        self.loss(idx, targets)
    }

    /// Hugging Face's causal-LM loss (`labels = input_ids`): logits at `t` predict token `t + 1`;
    /// label < 0 is ignored.
    pub fn causal_lm_loss(
        &self,
        idx: Tensor<2, Int>,
        labels: Tensor<2, Int>,
    ) -> (Tensor<3>, Tensor<1>) {
        let [b, t] = idx.dims();
        let logits = self.forward(idx);
        let [_, _, v] = logits.dims();
        let shifted = logits.clone().narrow(1, 0, t - 1);
        let loss = cross_entropy_ignore(shifted.reshape([b, t - 1, v]), labels.narrow(1, 1, t - 1));
        (logits, loss)
    }

    /// Inference copy: no autodiff, dropout off, LoRA merged (the exercise's `model.eval()`).
    pub fn eval(&self) -> Self {
        self.valid().merge()
    }

    /// Back to training: LoRA un-merged, gradients and dropout as configured (`model.train()`).
    pub fn train_mode(self) -> Self {
        self.unmerge().train()
    }

    /// Add adapters to layers that have none (rank 0) and are in `targets`, keeping every base
    /// weight; new A is drawn as at init, B = 0, so the model function is unchanged.
    pub fn add_lora(
        mut self,
        targets: LoraTargets,
        rank: usize,
        alpha: f64,
        dropout: f64,
        scaling: Scaling,
    ) -> Self {
        let lin = |l: LoraLinear, on: bool| {
            if on && l.rank() == 0 {
                LoraLinear::from_base(l.weight, l.bias, rank, alpha, dropout, scaling)
            } else {
                l
            }
        };
        let emb = |e: LoraEmbedding, on: bool| {
            if on && e.rank() == 0 {
                LoraEmbedding::from_base(e.weight, rank, alpha, scaling)
            } else {
                e
            }
        };
        self.h = self
            .h
            .into_iter()
            .map(|mut b| {
                b.attn.c_attn = lin(b.attn.c_attn, targets.c_attn);
                b.attn.c_proj = lin(b.attn.c_proj, targets.attn_c_proj);
                b.mlp.c_fc = lin(b.mlp.c_fc, targets.c_fc);
                b.mlp.c_proj = lin(b.mlp.c_proj, targets.mlp_c_proj);
                b
            })
            .collect();
        self.wpe = emb(self.wpe, targets.wpe);
        self.wte = emb(self.wte, targets.wte);
        self
    }

    /// Generate `max_new_tokens` after `idx [batch, seq]`, cropping the context to `block_size`
    /// (minGPT's `generate`). Greedy unless `sample`; `top_k` keeps the k most likely tokens.
    pub fn generate(
        &self,
        idx: Tensor<2, Int>,
        max_new_tokens: usize,
        temperature: f64,
        sample: bool,
        top_k: Option<usize>,
    ) -> Tensor<2, Int> {
        let mut idx = idx;
        for _ in 0..max_new_tokens {
            let t = idx.dims()[1];
            let cond = if t <= self.block_size {
                idx.clone()
            } else {
                idx.clone().narrow(1, t - self.block_size, self.block_size)
            };
            let logits = self.last_logits(cond);
            let next = if sample {
                let mut logits = logits.div_scalar(temperature);
                if let Some(k) = top_k {
                    let kth = logits.clone().topk(k, 1).narrow(1, k - 1, 1);
                    let below = logits.clone().lower(kth.expand(logits.dims()));
                    logits = logits.mask_fill(below, f32::NEG_INFINITY);
                }
                softmax(logits, 1).categorical(1)
            } else {
                logits.argmax(1)
            };
            idx = Tensor::cat(vec![idx, next], 1);
        }
        idx
    }
}

impl LoraMerge for Gpt {
    fn merge(mut self) -> Self {
        if self.lm_head.is_none() && self.wte.rank() > 0 && !self.wte.merged {
            // Merging LoRA into a shared table would change the head too (PEFT's
            // merge_and_unload does, and its merged model differs from the unmerged one).
            let weight = self.wte.weight.val().detach().transpose();
            self.lm_head = Some(Linear {
                weight: Param::from_tensor(weight),
                bias: None,
            });
            self.head_untied_by_merge = true;
        }
        self.wte = self.wte.merge();
        self.wpe = self.wpe.merge();
        self.h = self.h.into_iter().map(Block::merge).collect();
        self
    }
    fn unmerge(mut self) -> Self {
        self.wte = self.wte.unmerge();
        self.wpe = self.wpe.unmerge();
        self.h = self.h.into_iter().map(Block::unmerge).collect();
        if self.head_untied_by_merge {
            self.lm_head = None;
            self.head_untied_by_merge = false;
        }
        self
    }
}

impl LoraMerge for Block {
    fn merge(mut self) -> Self {
        self.attn.c_attn = self.attn.c_attn.merge();
        self.attn.c_proj = self.attn.c_proj.merge();
        self.mlp.c_fc = self.mlp.c_fc.merge();
        self.mlp.c_proj = self.mlp.c_proj.merge();
        self
    }
    fn unmerge(mut self) -> Self {
        self.attn.c_attn = self.attn.c_attn.unmerge();
        self.attn.c_proj = self.attn.c_proj.unmerge();
        self.mlp.c_fc = self.mlp.c_fc.unmerge();
        self.mlp.c_proj = self.mlp.c_proj.unmerge();
        self
    }
}

/// Int tensor `[rows, cols]` from row-major ids.
pub fn ids_tensor(ids: Vec<i64>, shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids, shape), device)
}
