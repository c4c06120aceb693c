//! Training attention, cross-entropy, GELU and LayerNorm as one autodiff node each.
//!
//! Written with Burn's tensor ops, Burn's autodiff keeps every intermediate of causal attention
//! (scores, the mask fill, softmax's pieces, the dropout product: several `[batch, head, seq, seq]`
//! tensors per layer), of log-softmax over the vocabulary and of GELU's polynomial until the
//! backward pass. These ops keep only their inputs and recompute the rest in their hand-written
//! backward passes, as PyTorch's fused kernels do: the same functions, a fraction of the memory and
//! of the graph. `linear_cross_entropy` goes further for the head: it never forms the
//! `[tokens, vocab]` logits at all (chunks of rows, gradients computed with the value).
//!
//! They are a [`backend_extension`]: plain backend ops on flex, ndarray and the cubecl backends
//! (wgpu, vulkan), and the hand-written backward on their autodiff devices.

#![allow(deprecated)] // `NdArray`: deprecated upstream, still one of our backends.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{
    Autodiff, Backend, Cube, Dispatch, ExtensionType, Flex, NdArray, backend_extension,
};
use burn::nn::Dropout;
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Slice, TensorData};
use burn::tensor::{Int, Tensor};

use crate::host::{GELU_A, gelu_c};
use crate::kernels::RowKernels;
use lora_core::dropout::{KeptMask, MaskBits};
use lora_core::matmul::Matmul;
use lora_core::utils::flex_contiguous;

/// The dropout of [`GptKernels::causal_attention`].
#[derive(ExtensionType, Clone)]
pub enum Keep<B: Backend> {
    /// `{0, 1/keep}` `[batch, head, seq, seq]`, and `keep` (the probability to keep a score).
    Mask(FloatTensor<B>, f64),
    /// Hashed dropout ([`Pointwise::softmax_lse_hashed`]): the seed `[2]` (f32 uniforms in
    /// `[0, 1)`) and `keep`.
    Hashed(FloatTensor<B>, f64),
    /// No dropout.
    All,
}

/// The fused ops, per backend.
#[backend_extension(Cube, Flex, NdArray, Autodiff)]
pub trait GptKernels: Backend {
    /// Causal attention `(softmax(q·kᵀ·scale + bias)·keep)·v` of the `n_head` heads of q, k, v
    /// side by side in `qkv [batch, seq, 3·n_head·d]` (a `c_attn` output), bias `[1, 1, seq, seq]`
    /// (0 on and below the diagonal, −∞ above), keep the dropout mask `{0, 1/keep}`
    /// `[batch, head, seq, seq]` or none -> `[batch, head, seq, d]`, over `blocks` query blocks
    /// (none: the backend's choice, [`Pointwise::query_blocks`]; one with a mask). Taking `qkv`
    /// whole, the backward pass writes its gradient as one tensor (three slices of it would each
    /// cost a zero-filled `qkv`-sized tensor and a sum).
    fn causal_attention(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        #[extension_type] keep: Keep<Self>,
        n_head: usize,
        scale: f64,
        blocks: Option<usize>,
    ) -> FloatTensor<Self>;

    /// Negative log-likelihood of each row: logits `[n, vocab]`, targets `[n, 1]` in `0..vocab`
    /// -> `[n, 1]` `= −log_softmax(logits)[target]`.
    fn nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;

    /// Weighted cross-entropy of the logits `h·w` without them: h `[n, d]`, w `[d, vocab]` (a
    /// Linear's layout), targets `[n, 1]` in `0..vocab`, weights `[n, 1]` (f32) -> `[1]` (f32)
    /// `= Σᵢ weightᵢ · −log_softmax(hᵢ·w)[targetᵢ]`, `rows` rows at a time; on an autodiff device
    /// the gradients are computed in the same pass and kept (`[n, d]`, and `[d, vocab]` when w is
    /// trained), so the `[n, vocab]` logits never exist.
    fn linear_cross_entropy(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self>;

    /// LayerNorm over the last dim, computed in f32 and returned in x's dtype: x `[.., d]`, gamma,
    /// beta `[d]` -> `(x − mean)/√(var + eps)·gamma + beta` (biased var). On an autodiff device it
    /// keeps x and the per-row mean and `1/√(var + eps)` for its backward pass.
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;

    /// GELU, tanh approximation (GPT-2's `gelu_new`), any shape: `x·sigmoid(2u)`,
    /// `u = √(2/π)·(x + 0.044715·x³)`.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The element-wise kernels of the fused ops: Burn's ops, or (Flex, f32) the kernels of
/// [`crate::host`] (`exp` and GELU equal to Burn's ops bit for bit; the softmax rows sum in
/// sixteen lanes, within rounding of them); and how the head + loss op runs its products.
pub trait Pointwise: Matmul + MaskBits {
    /// Whether [`GptKernels::linear_cross_entropy`] computes its gradients over vocabulary slices
    /// ([`VocabSlices`]): on GPUs, not on the CPU (there it would only change the rounding).
    const SPLIT_VOCAB: bool = false;

    /// Whether the attention op copies q, k, v contiguous at sequence length `seq`: cubecl from 64
    /// (its matmuls run only their fallback kernel on the permuted views, 4x slower on an H100 at
    /// GPT-2's shapes; below 64 the products are small, and on Mesa's llvmpipe cubecl's autotune of
    /// a matmul fused with the copy hung with a cold cache). The host backends' matmuls take the
    /// strided views as they are.
    fn contiguous_heads(_seq: usize) -> bool {
        false
    }

    /// Whether the attention backward pass recomputes the probabilities from the forward pass's
    /// per-row log-sum-exp, `exp(scores·scale + bias − lse)` (one element-wise pass over the
    /// scores, as FlashAttention does), rather than the whole softmax (two row reductions more):
    /// on GPUs. The CPU keeps the softmax kernel, whose values the forward pass had.
    const PROBS_FROM_LSE: bool = false;

    /// `x [a, b, c, d]` -> `[a, c, b, d]` contiguous: the heads of the attention's q, k, v and
    /// output to and from `[batch, seq, head, d]`. Burn's copy; cubecl one pass of its own.
    fn swap_heads(x: FloatTensor<Self>) -> FloatTensor<Self> {
        contiguous4::<Self>(Self::float_swap_dims(x, 1, 2))
    }

    /// The gradient w.r.t. `qkv [batch, seq, 3·head·d]` from those w.r.t. q, k, v `[batch, head,
    /// seq, d]`: Burn's ops (a concatenation and a copy); cubecl one pass of its own.
    fn merge_heads(
        dq: FloatTensor<Self>,
        dk: FloatTensor<Self>,
        dv: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        merge_heads_composed::<Self>(dq, dk, dv)
    }

    /// Whether [`Pointwise::flash_attention`] takes heads of `d` in `dtype` (without a dropout
    /// mask tensor): then q, k, v stay strided views of the `c_attn` output, which its kernels
    /// read as they are.
    fn flash_takes(_d: usize, _dtype: DType) -> bool {
        false
    }

    /// Whether [`Pointwise::flash_attention_backward`] takes heads of `d` in `dtype`: then the
    /// forward pass keeps its output for it.
    fn flash_backward_takes(_d: usize, _dtype: DType) -> bool {
        false
    }

    /// Causal attention of q, k, v `[batch, head, seq, d]` in one pass where the backend has one
    /// ([`RowKernels::flash_attention`], cubecl): the output `[batch, head, seq, d]` and the
    /// log-sum-exp `[batch, head, seq, 1]` (f32). `None` (the default, and with a dropout mask
    /// tensor): [`attention_forward`] runs the query blocks.
    fn flash_attention(
        _qkv: &[FloatTensor<Self>; 3],
        _bias: &FloatTensor<Self>,
        _keep: &Keep<Self>,
        _scale: f64,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// The gradient w.r.t. `qkv [batch, seq, 3·head·d]` of [`Pointwise::flash_attention`] in one
    /// pass where the backend has one ([`RowKernels::flash_attention_backward`], cubecl): from q,
    /// k, v, the output o and its gradient dy `[batch, head, seq, d]`, the log-sum-exp and the
    /// hashed dropout's seed and keep. `None` (the default): the query blocks.
    #[allow(clippy::too_many_arguments)]
    fn flash_attention_backward(
        _qkv: &[FloatTensor<Self>; 3],
        _o: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
        _bias: FloatTensor<Self>,
        _drop: Option<(FloatTensor<Self>, f64)>,
        _scale: f64,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// `exp(x)`.
    fn fused_exp(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_exp(x)
    }

    /// The query blocks of causal attention at sequence length `seq` ([`query_blocks`]): 1 on the
    /// CPU (all queries against all keys, the products' rounding unchanged); on cubecl, blocks of
    /// 256 queries, at most 4, which skip 3/8 of the scores at 1024 (above the diagonal).
    fn query_blocks(_seq: usize) -> usize {
        1
    }

    /// `softmax(scores·scale + bias)` over the last dim: scores `[b, h, tc, w]` of queries
    /// `start..start + tc` and keys `..w` of bias `[1, 1, t, t]` ([`bias_block`]).
    fn fused_softmax(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        softmax_composed::<Self>(scores, bias, start, scale)
    }

    /// Softmax's backward pass over the last dim, times the scores' scale:
    /// `(p·(dp − Σ dp·p))·scale`, p and dp `[b, h, t, t]`.
    fn fused_softmax_grad(
        p: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        softmax_grad_composed::<Self>(p, dp, scale)
    }

    /// [`GptKernels::gelu_tanh`]'s forward values.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu_composed::<Self>(x)
    }

    /// `g · d gelu(x) / dx`.
    fn fused_gelu_grad(x: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu_grad_composed::<Self>(x, g)
    }

    /// [`Pointwise::fused_softmax`]'s probabilities and the per-row log-sum-exp
    /// `max + log Σ exp(x − max)` `[b, h, tc, 1]` (f32) of `x = scores·scale + bias`.
    fn fused_softmax_lse(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        softmax_lse_composed::<Self>(scores, bias, start, scale)
    }

    /// [`Pointwise::fused_softmax_lse`] with hashed dropout: the probabilities times the
    /// `{0, 1/keep}` mask that [`hashed_mask`] draws from `seed` (`[2]`, f32 uniforms), and the
    /// log-sum-exp. The mask of a score depends on its place in the whole `[t, t]` scores, not
    /// on the block. The backward pass draws the same mask again
    /// ([`Pointwise::softmax_grad_hashed`]) instead of keeping it. Composed here with the mask
    /// made on the host; one kernel on cubecl.
    fn softmax_lse_hashed(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        softmax_lse_hashed_composed::<Self>(scores, bias, start, seed, scale, keep)
    }

    /// The backward pass of [`Pointwise::softmax_lse_hashed`] from its log-sum-exp: with
    /// `p = exp(scores·scale + bias − lse)` again, the dropped probabilities `p·mask` (for the
    /// gradient of v) and the softmax backward `p·(g − Σ g·p)·scale` for `g = dp·mask`. lse is
    /// the whole `[b, h, t, 1]` of all query blocks, as the bias (the kernel reads the block's
    /// rows of both, no slice copied).
    #[allow(clippy::too_many_arguments)]
    fn softmax_grad_hashed(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        lse: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        softmax_grad_hashed_composed::<Self>(scores, bias, start, lse, dp, seed, scale, keep)
    }

    /// [`GptKernels::layer_norm`]'s value and, per row, the mean and `rstd = 1/√(var + eps)`
    /// `[.., 1]` (f32). One kernel on cubecl.
    fn layer_norm_stats(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        layer_norm_composed::<Self>(x, gamma, beta, eps)
    }

    /// LayerNorm's input gradient from [`Pointwise::layer_norm_stats`]'s mean and rstd: with
    /// `x̂ = (x − mean)·rstd` and `g = dy·gamma`, `rstd·(g − mean(g) − x̂·mean(g·x̂))` in x's
    /// dtype. One kernel on cubecl.
    fn layer_norm_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        layer_norm_grad_composed::<Self>(x, gamma, mean, rstd, dy)
    }

    /// Per row of `logits [n, v]` with targets `[n, 1]` and weights `[n, 1]` (f32): the weighted
    /// loss `w·(−log_softmax(x)[t]) [n, 1]` (f32) and, when `grad`, its gradient
    /// `w·(softmax(x) − onehot(t)) [n, v]` in the logits' dtype.
    fn ce_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        ce_rows_composed::<Self>(logits, targets, weights, grad)
    }

    /// [`Pointwise::ce_rows`]'s loss and gradient, the gradient in vocabulary slices of `kp`
    /// columns, `[⌈v / kp⌉, rows, kp]` ([`VocabSlices`]).
    fn ce_rows_sliced(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        kp: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, d) = Self::ce_rows(logits, targets, weights, true);
        (
            loss,
            slice_vocab::<Self>(d.expect("asked for the gradient"), kp),
        )
    }
}

fn ce_rows_composed<B: Pointwise>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    weights: FloatTensor<B>,
    grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let dt = logits.dtype();
    let p = nll_parts::<B>(B::float_cast(logits, FloatDType::F32), targets.clone());
    let loss = B::float_mul(p.nll, weights.clone());
    let d = grad.then(|| {
        // d/dlogits = weight·(softmax − onehot(target)).
        let d = minus_onehot::<B>(B::float_div(p.exp, p.sum), targets);
        B::float_cast(B::float_mul(d, weights), dt.into())
    });
    (loss, d)
}

/// `t [d]` as `[1, .., 1, d]` of rank `rank`, in f32.
fn along_last<B: Backend>(t: FloatTensor<B>, rank: usize) -> FloatTensor<B> {
    let mut dims = vec![1; rank];
    dims[rank - 1] = t.shape()[0];
    B::float_reshape(B::float_cast(t, FloatDType::F32), dims.into())
}

/// `(x − mean)·rstd` in f32.
fn normalized<B: Backend>(
    x: FloatTensor<B>,
    mean: FloatTensor<B>,
    rstd: FloatTensor<B>,
) -> FloatTensor<B> {
    let x = B::float_cast(x, FloatDType::F32);
    B::float_mul(B::float_sub(x, mean), rstd)
}

/// [`Pointwise::layer_norm_stats`] in Burn's ops (Burn's `layer_norm`, with its mean and rstd).
fn layer_norm_composed<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    beta: FloatTensor<B>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (dt, rank) = (x.dtype(), x.shape().num_dims());
    let x = B::float_cast(x, FloatDType::F32);
    let mean = B::float_mean_dim(x.clone(), rank - 1);
    let centered = B::float_sub(x, mean.clone());
    let var = B::float_mean_dim(B::float_mul(centered.clone(), centered.clone()), rank - 1);
    let rstd = B::float_recip(B::float_sqrt(B::float_add_scalar(var, eps.into())));
    let y = B::float_mul(
        B::float_mul(centered, rstd.clone()),
        along_last::<B>(gamma, rank),
    );
    let y = B::float_add(y, along_last::<B>(beta, rank));
    (B::float_cast(y, dt.into()), mean, rstd)
}

/// [`Pointwise::layer_norm_grad`] in Burn's ops.
fn layer_norm_grad_composed<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    mean: FloatTensor<B>,
    rstd: FloatTensor<B>,
    dy: FloatTensor<B>,
) -> FloatTensor<B> {
    let (dt, rank) = (x.dtype(), x.shape().num_dims());
    let xh = normalized::<B>(x, mean, rstd.clone());
    let g = B::float_mul(
        B::float_cast(dy, FloatDType::F32),
        along_last::<B>(gamma, rank),
    );
    let mg = B::float_mean_dim(g.clone(), rank - 1);
    let mgx = B::float_mean_dim(B::float_mul(g.clone(), xh.clone()), rank - 1);
    let dx = B::float_sub(B::float_sub(g, mg), B::float_mul(xh, mgx));
    B::float_cast(B::float_mul(dx, rstd), dt.into())
}

/// [`Pointwise::softmax_lse_hashed`] in Burn's ops, the mask made on the host ([`hashed_mask`]).
fn softmax_lse_hashed_composed<B: Pointwise>(
    scores: FloatTensor<B>,
    bias: FloatTensor<B>,
    start: usize,
    seed: FloatTensor<B>,
    scale: f64,
    keep: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let t = bias.shape()[2];
    let (p, lse) = B::fused_softmax_lse(scores, bias, start, scale);
    let mask = hashed_mask::<B>(seed, &p, QueryRows { start, t }, keep);
    (B::float_mul(p, mask), lse)
}

/// [`Pointwise::softmax_grad_hashed`] in Burn's ops, the mask made on the host.
#[allow(clippy::too_many_arguments)]
fn softmax_grad_hashed_composed<B: Pointwise>(
    scores: FloatTensor<B>,
    bias: FloatTensor<B>,
    start: usize,
    lse: FloatTensor<B>,
    dp: FloatTensor<B>,
    seed: FloatTensor<B>,
    scale: f64,
    keep: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let t = bias.shape()[2];
    let lse = seq_rows::<B>(&lse, start..start + scores.shape()[2]);
    let p = probs_from_lse::<B>(scores, bias, start, scale, lse);
    let mask = hashed_mask::<B>(seed, &p, QueryRows { start, t }, keep);
    let pd = B::float_mul(p.clone(), mask.clone());
    (pd, B::fused_softmax_grad(p, B::float_mul(dp, mask), scale))
}

fn softmax_composed<B: Pointwise>(
    scores: FloatTensor<B>,
    bias: FloatTensor<B>,
    start: usize,
    scale: f64,
) -> FloatTensor<B> {
    let (exp, _, sum) = softmax_parts::<B>(scores, bias, start, scale);
    B::float_div(exp, sum)
}

/// Softmax as Burn's autodiff composes it (max, exp, sum; then a divide): `exp(x − max)`, the
/// row max and the row sum of `x = scores·scale + bias`, for the block of scores of queries
/// `start..` ([`bias_block`]).
fn softmax_parts<B: Pointwise>(
    scores: FloatTensor<B>,
    bias: FloatTensor<B>,
    start: usize,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let bias = bias_block::<B>(bias, start, &scores);
    let scores = B::float_add(B::float_mul_scalar(scores, scale.into()), bias);
    let max = B::float_max_dim(scores.clone(), 3);
    let exp = B::fused_exp(B::float_sub(scores, max.clone()));
    let sum = B::float_sum_dim(exp.clone(), 3);
    (exp, max, sum)
}

fn softmax_grad_composed<B: Backend>(
    p: FloatTensor<B>,
    dp: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    let rows = B::float_sum_dim(B::float_mul(dp.clone(), p.clone()), 3);
    B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, rows)), scale.into())
}

fn gelu_composed<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(x.clone(), gelu_gate::<B>(x))
}

fn gelu_grad_composed<B: Backend>(x: FloatTensor<B>, g: FloatTensor<B>) -> FloatTensor<B> {
    // d/dx x·s(2u) = s + x·s·(1 − s)·c·(1 + 3·0.044715·x²), s = sigmoid(2u).
    let s = gelu_gate::<B>(x.clone());
    let slope = B::float_mul_scalar(
        B::float_add_scalar(
            B::float_mul_scalar(B::float_mul(x.clone(), x.clone()), (3.0 * GELU_A).into()),
            1.0f64.into(),
        ),
        gelu_c().into(),
    );
    let ds = B::float_sub(s.clone(), B::float_mul(s.clone(), s.clone()));
    let d = B::float_add(s, B::float_mul(B::float_mul(x, ds), slope));
    B::float_mul(g, d)
}

/// Hashed dropout's seed and keep probability as the one-pass attention ops take them: without
/// dropout, `like` stands in for the seed (keep 1: never read).
fn seed_and_keep(
    like: &FloatTensor<Cube>,
    drop: Option<(FloatTensor<Cube>, f64)>,
) -> (FloatTensor<Cube>, f64) {
    drop.unwrap_or_else(|| (like.clone(), 1.0))
}

impl Pointwise for Cube {
    const SPLIT_VOCAB: bool = true;
    const PROBS_FROM_LSE: bool = true;

    fn contiguous_heads(seq: usize) -> bool {
        seq >= 64
    }

    fn query_blocks(seq: usize) -> usize {
        (seq / 256).clamp(1, 4)
    }

    fn swap_heads(x: FloatTensor<Self>) -> FloatTensor<Self> {
        <Self as RowKernels>::swap_heads(x)
    }

    fn flash_takes(d: usize, dtype: DType) -> bool {
        crate::flash::flash_takes(d, dtype)
    }

    fn flash_backward_takes(d: usize, dtype: DType) -> bool {
        crate::flash::flash_backward_takes(d, dtype)
    }

    /// Heads of 64 in one kernel ([`crate::flash`]); the output is stored as `[batch, seq, head,
    /// d]` (a view returned), so that the caller's merge of the heads is free.
    fn flash_attention(
        [q, k, v]: &[FloatTensor<Self>; 3],
        bias: &FloatTensor<Self>,
        keep: &Keep<Self>,
        scale: f64,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        if !crate::flash::flash_takes(q.shape()[3], q.dtype()) {
            return None;
        }
        let drop = match keep {
            Keep::Mask(..) => return None,
            Keep::Hashed(seed, p) => Some((seed.clone(), *p)),
            Keep::All => None,
        };
        let (seed, p) = seed_and_keep(q, drop);
        let (o, lse) = <Self as RowKernels>::flash_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            bias.clone(),
            seed,
            scale,
            p,
        );
        Some((Self::float_swap_dims(o, 1, 2), lse))
    }

    fn flash_attention_backward(
        [q, k, v]: &[FloatTensor<Self>; 3],
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        drop: Option<(FloatTensor<Self>, f64)>,
        scale: f64,
    ) -> Option<FloatTensor<Self>> {
        if !crate::flash::flash_backward_takes(q.shape()[3], q.dtype()) {
            return None;
        }
        let (seed, p) = seed_and_keep(q, drop);
        Some(<Self as RowKernels>::flash_attention_backward(
            q.clone(),
            k.clone(),
            v.clone(),
            o,
            lse,
            dy,
            bias,
            seed,
            scale,
            p,
        ))
    }

    fn merge_heads(
        dq: FloatTensor<Self>,
        dk: FloatTensor<Self>,
        dv: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        <Self as RowKernels>::merge_heads(dq, dk, dv)
    }

    /// One row kernel ([`crate::kernels`]) where the bias is one `[t, t]` for all heads.
    fn fused_softmax(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        match bias_holds::<Self>(&scores, &bias, start) {
            true => <Self as RowKernels>::softmax_lse(scores, bias, start, scale).0,
            false => softmax_composed::<Self>(scores, bias, start, scale),
        }
    }

    /// One row kernel ([`crate::kernels`]) where the bias is one `[t, t]` for all heads.
    fn fused_softmax_lse(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match bias_holds::<Self>(&scores, &bias, start) {
            true => <Self as RowKernels>::softmax_lse(scores, bias, start, scale),
            false => softmax_lse_composed::<Self>(scores, bias, start, scale),
        }
    }

    /// One row kernel ([`crate::kernels`]).
    fn fused_softmax_grad(
        p: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        match p.shape() == dp.shape() && p.dtype() == dp.dtype() {
            true => <Self as RowKernels>::softmax_grad(p, dp, scale),
            false => softmax_grad_composed::<Self>(p, dp, scale),
        }
    }

    /// One row kernel ([`crate::kernels`]) where the bias is one `[t, t]` for all heads: the
    /// mask is a hash of the seed and each score's position, never a tensor.
    fn softmax_lse_hashed(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match bias_holds::<Self>(&scores, &bias, start) {
            true => {
                <Self as RowKernels>::softmax_lse_hashed(scores, bias, start, seed, scale, keep)
            }
            false => softmax_lse_hashed_composed::<Self>(scores, bias, start, seed, scale, keep),
        }
    }

    /// One row kernel ([`crate::kernels`]) where the bias is one `[t, t]` for all heads and dp
    /// has the scores' shape and dtype.
    fn softmax_grad_hashed(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        lse: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let fits = bias_holds::<Self>(&scores, &bias, start)
            && scores.shape() == dp.shape()
            && scores.dtype() == dp.dtype();
        match fits {
            true => <Self as RowKernels>::softmax_grad_hashed(
                scores, bias, start, lse, dp, seed, scale, keep,
            ),
            false => softmax_grad_hashed_composed::<Self>(
                scores, bias, start, lse, dp, seed, scale, keep,
            ),
        }
    }

    /// One row kernel ([`crate::kernels`]).
    fn layer_norm_stats(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        <Self as RowKernels>::layer_norm(x, gamma, beta, eps)
    }

    /// One row kernel ([`crate::kernels`]).
    fn layer_norm_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        <Self as RowKernels>::layer_norm_grad(x, gamma, mean, rstd, dy)
    }

    /// One kernel ([`crate::kernels`]) from a vocabulary of 1024 up (GPT-2's head); Burn's ops
    /// below (a 256-unit cube per row would idle).
    fn ce_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if logits.shape()[1] < 1024 {
            return ce_rows_composed::<Self>(logits, targets, weights, grad);
        }
        let [rows, v] = logits.shape().dims::<2>();
        let weights = Self::float_cast(weights, FloatDType::F32);
        match grad {
            true => {
                let (loss, d) = <Self as RowKernels>::ce_rows(logits, targets, weights, v);
                (loss, Some(Self::float_reshape(d, [rows, v].into())))
            }
            false => (
                <Self as RowKernels>::ce_rows_loss(logits, targets, weights),
                None,
            ),
        }
    }

    /// The rows kernel writes the slices itself, zeros included ([`VocabSlices`] slices only
    /// vocabularies of 1024 up, where the kernel runs).
    fn ce_rows_sliced(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        kp: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let weights = Self::float_cast(weights, FloatDType::F32);
        <Self as RowKernels>::ce_rows(logits, targets, weights, kp)
    }
}
impl Pointwise for NdArray {}

impl Pointwise for Flex {
    fn fused_exp(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return Self::float_exp(x);
        }
        let mut x = flex_contiguous(x);
        crate::host::exp(flex_f32_mut(&mut x));
        x
    }

    fn fused_softmax(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        let fits = bias_holds::<Self>(&scores, &bias, start);
        if scores.dtype() != DType::F32 || bias.dtype() != DType::F32 || !fits {
            return softmax_composed::<Self>(scores, bias, start, scale);
        }
        let t = scores.shape()[scores.shape().num_dims() - 1];
        let bias = flex_contiguous(bias_block::<Self>(bias, start, &scores));
        let mut x = flex_contiguous(scores);
        crate::host::softmax_rows(flex_f32_mut(&mut x), flex_f32(&bias), t, scale as f32);
        x
    }

    fn fused_softmax_grad(
        p: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        if p.dtype() != DType::F32 || dp.dtype() != DType::F32 || p.shape() != dp.shape() {
            return softmax_grad_composed::<Self>(p, dp, scale);
        }
        let t = p.shape()[p.shape().num_dims() - 1];
        let p = flex_contiguous(p);
        let mut dp = flex_contiguous(dp);
        crate::host::softmax_grad_rows(flex_f32(&p), flex_f32_mut(&mut dp), t, scale as f32);
        dp
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return gelu_composed::<Self>(x);
        }
        let shape = x.shape();
        let x = flex_contiguous(x);
        let x = flex_f32(&x);
        let mut out = Vec::with_capacity(x.len());
        crate::host::gelu(x, &mut out.spare_capacity_mut()[..x.len()]);
        // SAFETY: `gelu` wrote every element.
        unsafe { out.set_len(x.len()) };
        Self::float_from_data(TensorData::new(out, shape), &Default::default())
    }

    fn fused_gelu_grad(x: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 || g.dtype() != DType::F32 || x.shape() != g.shape() {
            return gelu_grad_composed::<Self>(x, g);
        }
        let shape = x.shape();
        let (x, g) = (flex_contiguous(x), flex_contiguous(g));
        let (x, g) = (flex_f32(&x), flex_f32(&g));
        let mut out = Vec::with_capacity(x.len());
        crate::host::gelu_grad(x, g, &mut out.spare_capacity_mut()[..x.len()]);
        // SAFETY: `gelu_grad` wrote every element.
        unsafe { out.set_len(x.len()) };
        Self::float_from_data(TensorData::new(out, shape), &Default::default())
    }
}

/// Whether `bias` is one `[t, t]` matrix, broadcast over the scores' other dims, that holds the
/// block of scores `[.., tc, w]` of queries `start..start + tc` (what the row kernels take: the
/// whole bias on cubecl, its [`bias_block`] on the host).
fn bias_holds<B: Backend>(scores: &FloatTensor<B>, bias: &FloatTensor<B>, start: usize) -> bool {
    let (s, b) = (scores.shape(), bias.shape());
    let r = s.num_dims();
    r >= 2
        && b.num_dims() == r
        && b[..r - 2].iter().all(|&d| d == 1)
        && b[r - 2] == b[r - 1]
        && start + s[r - 2] <= b[r - 2]
        && s[r - 1] <= b[r - 1]
}

/// The bias of the block of scores `[.., tc, w]` of queries `start..start + tc`: rows
/// `start..start + tc` and columns `..w` of `bias [.., t, t]` (the whole bias when that is all).
fn bias_block<B: Backend>(
    bias: FloatTensor<B>,
    start: usize,
    scores: &FloatTensor<B>,
) -> FloatTensor<B> {
    let (s, b) = (scores.shape(), bias.shape());
    let r = b.num_dims();
    let [tc, w] = [s[s.num_dims() - 2], s[s.num_dims() - 1]];
    if start == 0 && b[r - 2] == tc && b[r - 1] == w {
        return bias;
    }
    let mut ranges = vec![Slice::full(); r - 2];
    ranges.push(Slice::from(start..start + tc));
    ranges.push(Slice::from(0..w));
    B::float_slice(bias, &ranges)
}

/// The f32 values of a contiguous Flex tensor.
fn flex_f32(t: &FloatTensor<Flex>) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// The f32 values of a contiguous Flex tensor, to overwrite in place (its storage is copied
/// first where another tensor shares it).
fn flex_f32_mut(t: &mut FloatTensor<Flex>) -> &mut [f32] {
    let (a, b) = t.layout().contiguous_offsets().expect("contiguous");
    &mut t.storage_mut::<f32>()[a..b]
}

/// `sigmoid(2u)` of [`GptKernels::gelu_tanh`].
fn gelu_gate<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let x3 = B::float_mul(B::float_mul(x.clone(), x.clone()), x.clone());
    let u2 = B::float_add(x, B::float_mul_scalar(x3, GELU_A.into()));
    B::sigmoid(B::float_mul_scalar(u2, gelu_c().into()))
}

/// Attention scores `q·kᵀ`, `[batch, head, seq, seq]`.
fn scores<B: Pointwise>(q: FloatTensor<B>, k: FloatTensor<B>) -> FloatTensor<B> {
    B::mm(q, B::float_swap_dims(k, 2, 3))
}

/// Attention probabilities `softmax(q·kᵀ·scale + bias)` of queries `start..` (q's rows):
/// `[batch, head, tc, w]` for q `[.., tc, d]`, k `[.., w, d]`.
fn probs<B: Pointwise>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    bias: FloatTensor<B>,
    start: usize,
    scale: f64,
) -> FloatTensor<B> {
    B::fused_softmax(scores::<B>(q, k), bias, start, scale)
}

/// Causal attention in blocks of queries: block `start..end` needs only keys `..end` (the later
/// ones are masked), so its scores are `[.., end − start, end]` and the `n` blocks together
/// skip the blocks above the diagonal (`1 − (n + 1)/2n` of the products and of the softmax
/// work: 3/8 at n = 4). `n = 1`: all queries against all keys.
fn query_blocks(t: usize, n: usize) -> impl DoubleEndedIterator<Item = (usize, usize)> {
    let n = n.clamp(1, t.max(1));
    (0..n).map(move |i| (i * t / n, (i + 1) * t / n))
}

/// Rows `range` of dim 2 (the sequence) of `x [batch, head, seq, ..]`: x itself when that is all.
fn seq_rows<B: Backend>(x: &FloatTensor<B>, range: std::ops::Range<usize>) -> FloatTensor<B> {
    let shape = x.shape();
    if range.start == 0 && range.end == shape[2] {
        return x.clone();
    }
    let mut ranges = vec![Slice::full(); shape.num_dims()];
    ranges[2] = Slice::from(range);
    B::float_slice(x.clone(), &ranges)
}

/// The blocks side by side along dim 2 (the sequence).
fn cat_seq<B: Backend>(mut parts: Vec<FloatTensor<B>>) -> FloatTensor<B> {
    match parts.len() {
        1 => parts.pop().expect("one part"),
        _ => B::float_cat(parts, 2),
    }
}

/// `acc + part` over `part`'s rows `..w` of dim 2 (keys `..w`): part itself for the first.
fn add_key_rows<B: Backend>(acc: Option<FloatTensor<B>>, part: FloatTensor<B>) -> FloatTensor<B> {
    let Some(acc) = acc else { return part };
    let w = part.shape()[2];
    if w == acc.shape()[2] {
        return B::float_add(acc, part);
    }
    let mut ranges = vec![Slice::full(); part.shape().num_dims()];
    ranges[2] = Slice::from(0..w);
    let sum = B::float_add(B::float_slice(acc.clone(), &ranges), part);
    B::float_slice_assign(acc, &ranges, sum)
}

/// q, k, v `[batch, head, seq, d]` of `qkv [batch, seq, 3·head·d]`: copies where
/// [`Pointwise::contiguous_heads`] asks for them, unless every pass that reads them is a one-pass
/// kernel, which reads the strided views as they are: the forward ([`Pointwise::flash_takes`];
/// `masked`: a dropout mask tensor, which it does not take) and, when `training`, the backward
/// ([`Pointwise::flash_backward_takes`]; else the query blocks' matmuls read the heads again).
fn split_heads<B: Pointwise>(
    qkv: FloatTensor<B>,
    n_head: usize,
    masked: bool,
    training: bool,
) -> [FloatTensor<B>; 3] {
    let [b, t, c3] = qkv.shape().dims::<3>();
    let hs = c3 / 3 / n_head;
    let dt = qkv.dtype();
    let kernels =
        !masked && B::flash_takes(hs, dt) && (!training || B::flash_backward_takes(hs, dt));
    let copy = B::contiguous_heads(t) && !kernels;
    // `[b, t, 3·head, hs]` is a view; each third of its heads a strided one.
    let heads = B::float_reshape(qkv, [b, t, 3 * n_head, hs].into());
    [0, 1, 2].map(|j| {
        let range = Slice::from(j * n_head..(j + 1) * n_head);
        let z = B::float_slice(heads.clone(), &[Slice::full(), Slice::full(), range]);
        match copy {
            true => B::swap_heads(z),
            false => B::float_swap_dims(z, 1, 2),
        }
    })
}

/// `x [a, b, c, d]` contiguous: through a 3-d reshape, which copies a strided view.
fn contiguous4<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let [a, b, c, d] = x.shape().dims::<4>();
    B::float_reshape(
        B::float_reshape(x, [a * b, c, d].into()),
        [a, b, c, d].into(),
    )
}

/// The gradient w.r.t. `qkv [batch, seq, 3·head·d]` from those w.r.t. q, k, v `[batch, head, seq, d]`.
fn merge_heads_composed<B: Backend>(
    dq: FloatTensor<B>,
    dk: FloatTensor<B>,
    dv: FloatTensor<B>,
) -> FloatTensor<B> {
    let [b, h, t, hs] = dq.shape().dims::<4>();
    let parts = [dq, dk, dv].map(|d| B::float_swap_dims(d, 1, 2)).to_vec();
    B::float_reshape(B::float_cat(parts, 2), [b, t, 3 * h * hs].into())
}

/// The number of query blocks: `blocks`, or the backend's choice ([`Pointwise::query_blocks`]);
/// one with a dropout mask (a whole `[t, t]` tensor).
fn blocks_for<B: Pointwise>(blocks: Option<usize>, t: usize, masked: bool) -> usize {
    match masked {
        true => 1,
        false => blocks.unwrap_or_else(|| B::query_blocks(t)),
    }
}

/// The attention output and, with `lse` (for [`Pointwise::PROBS_FROM_LSE`]) or hashed dropout,
/// the scores' per-row log-sum-exp `[batch, head, seq, 1]` (f32); in one pass where the backend
/// has one ([`Pointwise::flash_attention`], which always gives the log-sum-exp; then `true`), else
/// over `blocks` query blocks ([`query_blocks`]).
fn attention_forward<B: Pointwise>(
    qkv: &[FloatTensor<B>; 3],
    bias: FloatTensor<B>,
    keep: Keep<B>,
    scale: f64,
    lse: bool,
    blocks: usize,
) -> (FloatTensor<B>, Option<FloatTensor<B>>, bool) {
    if let Some((out, lse)) = B::flash_attention(qkv, &bias, &keep, scale) {
        return (out, Some(lse), true);
    }
    let [q, k, v] = qkv;
    let t = q.shape()[2];
    let (mut out, mut lses) = (vec![], vec![]);
    for (start, end) in query_blocks(t, blocks) {
        let s = scores::<B>(seq_rows::<B>(q, start..end), seq_rows::<B>(k, 0..end));
        let bias = bias.clone();
        let (p, lse) = match (&keep, lse) {
            (Keep::Hashed(seed, keep), _) => {
                let (p, lse) = B::softmax_lse_hashed(s, bias, start, seed.clone(), scale, *keep);
                (p, Some(lse))
            }
            (keep, true) => {
                let (p, lse) = B::fused_softmax_lse(s, bias, start, scale);
                (masked_by(p, keep.clone()), Some(lse))
            }
            (keep, false) => (
                masked_by(B::fused_softmax(s, bias, start, scale), keep.clone()),
                None,
            ),
        };
        out.push(B::mm(p, seq_rows::<B>(v, 0..end)));
        lses.extend(lse);
    }
    let lse = (!lses.is_empty()).then(|| cat_seq::<B>(lses));
    let out = cat_seq::<B>(out);
    // Where the heads are copied anyway: stored as `[batch, seq, head, d]` (a view of it returned),
    // so that the caller's merge of the heads, `[batch, seq, head·d]`, is free.
    let out = match B::contiguous_heads(t) {
        true => B::float_swap_dims(B::swap_heads(out), 1, 2),
        false => out,
    };
    (out, lse, false)
}

/// `p · mask` for [`Keep::Mask`], p otherwise.
fn masked_by<B: Backend>(p: FloatTensor<B>, keep: Keep<B>) -> FloatTensor<B> {
    match keep {
        Keep::Mask(m, _) => B::float_mul(p, m),
        _ => p,
    }
}

/// The rows of a block of scores `[.., tc, w]` in the whole `[t, t]` scores of each head: queries
/// `start..start + tc`.
#[derive(Clone, Copy, Debug)]
struct QueryRows {
    start: usize,
    t: usize,
}

/// The `{0, 1/keep}` mask of hashed dropout ([`Pointwise::softmax_lse_hashed`]) for a block of
/// scores like `like` (its shape, dtype and device) at `rows`, made on the host from `seed`
/// (`[2]`, f32 uniforms): the kernels' hash ([`crate::kernels`]) of each score's row among all
/// `[t, t]` score rows and its column.
fn hashed_mask<B: Backend>(
    seed: FloatTensor<B>,
    like: &FloatTensor<B>,
    rows: QueryRows,
    keep: f64,
) -> FloatTensor<B> {
    let seed = burn::tensor::read_sync(B::float_into_data(seed))
        .expect("the dropout seed reads back")
        .iter::<f32>()
        .collect::<Vec<_>>();
    let shape = like.shape();
    let [tc, w] = [shape[shape.num_dims() - 2], shape[shape.num_dims() - 1]];
    let n = shape.num_elements() / w.max(1);
    let QueryRows { start, t } = rows;
    let rows = (0..n).map(|r| (r / tc) * t + start + r % tc);
    let mask = hashed_mask_rows([seed[0], seed[1]], rows, w, keep);
    let mask = B::float_from_data(TensorData::new(mask, shape), &like.device());
    B::float_cast(mask, like.dtype().into())
}

/// Hashed dropout's `{0, 1/keep}` mask `[rows, t]` (row-major) for the seed's two uniforms.
#[cfg(test)]
pub(crate) fn hashed_mask_values(seed: [f32; 2], rows: usize, t: usize, keep: f64) -> Vec<f32> {
    hashed_mask_rows(seed, 0..rows, t, keep)
}

/// Hashed dropout's `{0, 1/keep}` mask of the given rows, `cols` columns each (row-major).
fn hashed_mask_rows(
    seed: [f32; 2],
    rows: impl Iterator<Item = usize>,
    cols: usize,
    keep: f64,
) -> Vec<f32> {
    let seeds = seed.map(|u| (u as f64 * 16_777_216.0) as u32);
    let threshold = crate::kernels::keep_threshold(keep);
    let value = (1.0 / keep) as f32;
    rows.flat_map(|r| {
        (0..cols).map(
            move |c| match crate::kernels::kept_host(r, c, seeds, threshold) {
                true => value,
                false => 0.0,
            },
        )
    })
    .collect()
}

/// [`softmax_composed`] (the same values) and the per-row `max + log Σ exp(x − max)` in f32.
fn softmax_lse_composed<B: Pointwise>(
    scores: FloatTensor<B>,
    bias: FloatTensor<B>,
    start: usize,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (exp, max, sum) = softmax_parts::<B>(scores, bias, start, scale);
    let f32 = |x| B::float_cast(x, FloatDType::F32);
    let lse = B::float_add(f32(max), B::float_log(f32(sum.clone())));
    (B::float_div(exp, sum), lse)
}

/// The probabilities again from the log-sum-exp: `exp(scores·scale + bias − lse)`, computed in
/// f32, returned in the scores' dtype; for the block of scores of queries `start..`
/// ([`bias_block`]), lse the block's rows.
fn probs_from_lse<B: Pointwise>(
    scores: FloatTensor<B>,
    bias: FloatTensor<B>,
    start: usize,
    scale: f64,
    lse: FloatTensor<B>,
) -> FloatTensor<B> {
    let dt = scores.dtype();
    let bias = bias_block::<B>(bias, start, &scores);
    let f32 = |x| B::float_cast(x, FloatDType::F32);
    let x = B::float_mul_scalar(f32(scores), scale.into());
    let x = B::float_add(x, f32(bias));
    B::float_cast(B::float_exp(B::float_sub(x, lse)), dt.into())
}

/// Per row of `x [n, vocab]`: `−log_softmax(x)[target] = log Σ exp(x − max) − (x[target] − max)`,
/// the row max, `exp(x − max)` and its row sum `Σ` (the pieces the gradients are made of).
struct NllParts<B: Backend> {
    nll: FloatTensor<B>,
    max: FloatTensor<B>,
    exp: FloatTensor<B>,
    sum: FloatTensor<B>,
}

fn nll_parts<B: Pointwise>(x: FloatTensor<B>, targets: IntTensor<B>) -> NllParts<B> {
    let max = B::float_max_dim(x.clone(), 1);
    let shifted = B::float_sub(x, max.clone());
    let exp = B::fused_exp(shifted.clone());
    let sum = B::float_sum_dim(exp.clone(), 1);
    let nll = B::float_sub(
        B::float_log(sum.clone()),
        B::float_gather(1, shifted, targets),
    );
    NllParts { nll, max, exp, sum }
}

/// `−log_softmax(x)[target]` per row of `x [n, vocab]`, and `max + log Σ exp(x − max)` (what
/// the gradient needs).
fn nll_forward<B: Pointwise>(
    x: FloatTensor<B>,
    targets: IntTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let p = nll_parts::<B>(x, targets);
    (p.nll, B::float_add(p.max, B::float_log(p.sum)))
}

/// `softmax − onehot(target)`: the gradient of `−log_softmax(x)[target]` w.r.t. `x`, from the
/// softmax `[n, vocab]` and targets `[n, 1]`.
fn minus_onehot<B: Backend>(softmax: FloatTensor<B>, targets: IntTensor<B>) -> FloatTensor<B> {
    let dtype = softmax.dtype().into();
    let minus_one = B::float_full(targets.shape(), (-1.0f64).into(), &softmax.device(), dtype);
    B::float_scatter(1, softmax, targets, minus_one, IndexingUpdateOp::Add)
}

/// `acc + x`, or `x` for the first term.
fn accumulate<B: Backend>(acc: Option<FloatTensor<B>>, x: FloatTensor<B>) -> FloatTensor<B> {
    match acc {
        Some(a) => B::float_add(a, x),
        None => x,
    }
}

/// [`GptKernels::linear_cross_entropy`]'s value and, when asked, its gradients w.r.t. h and w.
fn linear_ce<B: Pointwise>(
    h: FloatTensor<B>,
    w: FloatTensor<B>,
    targets: IntTensor<B>,
    weights: FloatTensor<B>,
    rows: usize,
    grad_h: bool,
    grad_w: bool,
) -> (
    FloatTensor<B>,
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
) {
    let n = h.shape()[0];
    let device = h.device();
    let rows = rows.max(1);
    let wt = B::float_transpose(w.clone());
    let slices = VocabSlices::of(w.shape()[1]).filter(|_| B::SPLIT_VOCAB && (grad_h || grad_w));
    let rhs = slices.filter(|_| grad_h).map(|sl| sl.rhs::<B>(wt.clone()));
    let (mut loss, mut dh, mut dw) = (None::<FloatTensor<B>>, vec![], None::<FloatTensor<B>>);
    for start in (0..n).step_by(rows) {
        // Rows by `select` (fresh contiguous tensors): with row slices (views at an offset) the
        // losses were wrong on wgpu from the second chunk on.
        let end = (start + rows).min(n);
        let idx = B::int_arange(start as i64..end as i64, &device, targets.dtype().into());
        let hc = B::float_select(h.clone(), 0, idx.clone());
        let tc = B::int_select(targets.clone(), 0, idx.clone());
        let wc = B::float_select(weights.clone(), 0, idx);
        let logits = B::mm(hc.clone(), w.clone());
        let (nll, d) = match slices {
            Some(sl) => {
                let (nll, d) = B::ce_rows_sliced(logits, tc, wc, sl.kp);
                (nll, Some(d))
            }
            None => B::ce_rows(logits, tc, wc, grad_h || grad_w),
        };
        loss = Some(accumulate::<B>(loss, B::float_sum(nll)));
        let Some(d) = d else {
            continue;
        };
        // d is `[rows, v]`, or `[s, rows, kp]` with `slices`.
        if grad_w {
            let g = match slices {
                Some(sl) => sl.dw_parts::<B>(hc, d.clone()),
                None => B::mm_tn(hc, d.clone()),
            };
            dw = Some(accumulate::<B>(dw, g));
        }
        if grad_h {
            dh.push(match &rhs {
                Some(rhs) => {
                    let out = [end - start, rhs.shape()[2]];
                    lora_core::matmul::sum_of_products::<B>(d, rhs.clone(), out)
                }
                None => B::mm(d, wt.clone()),
            });
        }
    }
    let loss = loss.unwrap_or_else(|| B::float_zeros([1].into(), &device, FloatDType::F32));
    let dw = match slices {
        Some(sl) => dw.map(|parts| sl.unslice::<B>(parts, w.shape()[1])),
        None => dw,
    };
    (loss, grad_h.then(|| B::float_cat(dh, 0)), dw)
}

/// The head's gradients on GPUs, over the vocabulary `v` in `s = 8` slices of `kp` columns (`kp`
/// a multiple of 8 from `v / 8` up; the last slice padded with zeros). The input gradient `d·wᵀ`
/// has K = v and only a `[rows, k]` output: as one product, GPT-2's head at 2048 rows is 96 tiles
/// of 128 × 128 for an H100's 132 SMs, each running the whole K (~33 TFLOP/s in f16 on `vulkan`);
/// as 8 products of K = kp in one batched matmul, then their sum, ~124 TFLOP/s. The rows kernel
/// writes the gradient in that layout (`[s, rows, kp]`), so neither product copies it; the
/// weight's gradient runs as 8 products `[k, kp]` too (~100 TFLOP/s, against ~65 as one).
/// Measured on an H100 (f16, `vulkan`, 2048 × 50257 × 768); 29 slices of 1733 (an odd row
/// stride) ran at ~61.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VocabSlices {
    /// Slices.
    pub s: usize,
    /// Columns per slice.
    pub kp: usize,
}

impl VocabSlices {
    /// The slices of a vocabulary of `v` ≥ 1024 (below: none, one product each).
    pub fn of(v: usize) -> Option<Self> {
        let kp = v.div_ceil(8).next_multiple_of(8);
        (v >= 1024).then(|| Self {
            s: v.div_ceil(kp),
            kp,
        })
    }

    /// `wᵀ [v, k]` zero-padded to `s·kp` rows, as `[s, kp, k]`: the right-hand sides of `d·wᵀ`.
    fn rhs<B: Backend>(self, wt: FloatTensor<B>) -> FloatTensor<B> {
        let k = wt.shape()[1];
        let padded = zero_pad::<B>(wt, 0, self.s * self.kp);
        B::float_reshape(padded, [self.s, self.kp, k].into())
    }

    /// `hᵀ·d` per slice: h `[rows, k]`, d `[s, rows, kp]` -> `[s, k, kp]`.
    fn dw_parts<B: Matmul>(self, h: FloatTensor<B>, d: FloatTensor<B>) -> FloatTensor<B> {
        let [rows, k] = h.shape().dims::<2>();
        let ht = B::float_swap_dims(B::float_reshape(h, [1, rows, k].into()), 1, 2);
        B::mm(ht, d)
    }

    /// `[s, k, kp]` per-slice products -> `[k, v]`: the slices side by side, the padding cut.
    fn unslice<B: Backend>(self, parts: FloatTensor<B>, v: usize) -> FloatTensor<B> {
        let k = parts.shape()[1];
        let side = B::float_reshape(
            B::float_swap_dims(parts, 0, 1),
            [k, self.s * self.kp].into(),
        );
        B::float_slice(side, &[Slice::full(), Slice::from(0..v)])
    }
}

/// `d [rows, v]` as vocabulary slices `[⌈v / kp⌉, rows, kp]`, zero-padded ([`VocabSlices`]).
fn slice_vocab<B: Backend>(d: FloatTensor<B>, kp: usize) -> FloatTensor<B> {
    let [rows, v] = d.shape().dims::<2>();
    let s = v.div_ceil(kp);
    let d = zero_pad::<B>(d, 1, s * kp);
    B::float_swap_dims(B::float_reshape(d, [rows, s, kp].into()), 0, 1)
}

/// `t` with zeros appended along `dim` up to length `len`.
fn zero_pad<B: Backend>(t: FloatTensor<B>, dim: usize, len: usize) -> FloatTensor<B> {
    let mut shape = t.shape();
    let pad = len - shape[dim];
    if pad == 0 {
        return t;
    }
    shape[dim] = pad;
    let zeros = B::float_zeros(shape, &t.device(), t.dtype().into());
    B::float_cat(vec![t, zeros], dim)
}

macro_rules! plain_backend {
    ($($b:ty),*) => {$(
        impl GptKernels for $b {
            fn causal_attention(
                qkv: FloatTensor<Self>,
                bias: FloatTensor<Self>,
                keep: Keep<Self>,
                n_head: usize,
                scale: f64,
                blocks: Option<usize>,
            ) -> FloatTensor<Self> {
                let masked = matches!(keep, Keep::Mask(..));
                let blocks = blocks_for::<Self>(blocks, qkv.shape()[1], masked);
                let heads = split_heads::<Self>(qkv, n_head, masked, false);
                attention_forward::<Self>(&heads, bias, keep, scale, false, blocks).0
            }

            fn nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
                nll_forward::<Self>(logits, targets).0
            }

            fn linear_cross_entropy(
                h: FloatTensor<Self>,
                w: FloatTensor<Self>,
                targets: IntTensor<Self>,
                weights: FloatTensor<Self>,
                rows: usize,
            ) -> FloatTensor<Self> {
                linear_ce::<Self>(h, w, targets, weights, rows, false, false).0
            }

            fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
                Self::fused_gelu(x)
            }

            fn layer_norm(
                x: FloatTensor<Self>,
                gamma: FloatTensor<Self>,
                beta: FloatTensor<Self>,
                eps: f64,
            ) -> FloatTensor<Self> {
                Self::layer_norm_stats(x, gamma, beta, eps).0
            }
        }
    )*};
}

plain_backend!(Cube, Flex, NdArray);

#[derive(Debug)]
struct AttentionBackward;

/// The attention's dropout as its backward pass keeps it.
#[derive(Clone, Debug)]
enum Dropped<B: Pointwise> {
    /// The mask, packed.
    Mask(KeptMask<B>),
    /// Hashed dropout's seed and keep probability: the mask is drawn again.
    Hashed(FloatTensor<B>, f64),
    None,
}

/// q, k, v `[batch, head, seq, d]` (contiguous on GPUs, or views of qkv for the one-pass attention:
/// the backward pass copies nothing), bias,
/// the dropout, scale, the log-sum-exp ([`Pointwise::PROBS_FROM_LSE`], and always with hashed
/// dropout), the query blocks, and the output where the one-pass forward made it
/// ([`Pointwise::flash_attention`]: its backward pass needs it).
type AttentionState<B> = (
    [FloatTensor<B>; 3],
    FloatTensor<B>,
    Dropped<B>,
    f64,
    Option<FloatTensor<B>>,
    usize,
    Option<FloatTensor<B>>,
);

impl<B: Pointwise> Backward<B, 1> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let Some(node) = node else { return };
        let ([q, k, v], bias, dropped, scale, lse, blocks, out) = ops.state;
        let t = q.shape()[2];
        if let (Some(o), Some(lse)) = (out, &lse) {
            let drop = match &dropped {
                Dropped::Hashed(seed, keep) => Some((seed.clone(), *keep)),
                _ => None,
            };
            let heads = [q.clone(), k.clone(), v.clone()];
            let (lse, bias) = (lse.clone(), bias.clone());
            if let Some(d) =
                B::flash_attention_backward(&heads, o, lse, dy.clone(), bias, drop, scale)
            {
                grads.register::<B>(node.id, d);
                return;
            }
        }
        // The output's gradient, from the caller's `[batch, seq, head, d]` view: contiguous once
        // for all blocks' products (on GPUs).
        let dy = match B::contiguous_heads(t) {
            true => B::swap_heads(B::float_swap_dims(dy, 1, 2)),
            false => dy,
        };
        let keep = match &dropped {
            Dropped::Mask(m) => Some(m.clone().for_mul()),
            _ => None,
        };
        let (mut dq, mut dk, mut dv) = (vec![], None, None);
        // The last block first: its key gradients cover all keys, the others' add to their start.
        for (start, end) in query_blocks(t, blocks).rev() {
            let qb = seq_rows::<B>(&q, start..end);
            let (kb, vb) = (seq_rows::<B>(&k, 0..end), seq_rows::<B>(&v, 0..end));
            let dy = seq_rows::<B>(&dy, start..end);
            let (ds, pd) = match (&dropped, &lse) {
                // The scores again; the dropped probabilities and the softmax backward in one
                // pass over them, the mask drawn again.
                (Dropped::Hashed(seed, keep), Some(lse)) => {
                    let s = scores::<B>(qb.clone(), kb.clone());
                    let dp = B::mm(dy.clone(), B::float_swap_dims(vb, 2, 3));
                    let (bias, lse, seed) = (bias.clone(), lse.clone(), seed.clone());
                    let (pd, ds) =
                        B::softmax_grad_hashed(s, bias, start, lse, dp, seed, scale, *keep);
                    (ds, pd)
                }
                (_, lse) => {
                    // Recompute the probabilities; the dropped ones are `p·keep`.
                    let p = match lse {
                        Some(lse) => {
                            let s = scores::<B>(qb.clone(), kb.clone());
                            let lse = seq_rows::<B>(lse, start..end);
                            probs_from_lse::<B>(s, bias.clone(), start, scale, lse)
                        }
                        None => probs::<B>(qb.clone(), kb.clone(), bias.clone(), start, scale),
                    };
                    let pd = match &keep {
                        Some(m) => m.mul(p.clone()),
                        None => p.clone(),
                    };
                    let dp = B::mm(dy.clone(), B::float_swap_dims(vb, 2, 3));
                    let dp = match &keep {
                        Some(m) => m.mul(dp),
                        None => dp,
                    };
                    // Softmax backward: ds = p·(dp − Σ dp·p), then the scale of the scores.
                    (B::fused_softmax_grad(p, dp, scale), pd)
                }
            };
            dv = Some(add_key_rows::<B>(
                dv,
                B::mm(B::float_swap_dims(pd, 2, 3), dy),
            ));
            dq.push(B::mm(ds.clone(), kb));
            dk = Some(add_key_rows::<B>(
                dk,
                B::mm(B::float_swap_dims(ds, 2, 3), qb),
            ));
        }
        dq.reverse();
        let (dk, dv) = (dk.expect("a block"), dv.expect("a block"));
        let dq = cat_seq::<B>(dq);
        grads.register::<B>(node.id, B::merge_heads(dq, dk, dv));
    }
}

#[derive(Debug)]
struct NllBackward;

impl<B: Pointwise> Backward<B, 1> for NllBackward {
    /// Logits, targets, `max + log Σ exp(x − max)` per row.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let Some(node) = node else { return };
        let (x, targets, lse) = ops.state;
        // d/dx = (softmax(x) − onehot(target))·g.
        let softmax = B::fused_exp(B::float_sub(x, lse));
        grads.register::<B>(
            node.id,
            B::float_mul(minus_onehot::<B>(softmax, targets), g),
        );
    }
}

#[derive(Debug)]
struct LinearCeBackward;

impl<B: Backend> Backward<B, 2> for LinearCeBackward {
    /// The gradients w.r.t. h and w, computed with the value.
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_h, node_w] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let g = B::float_reshape(g, [1, 1].into());
        let scaled = |d: FloatTensor<B>| {
            let g = B::float_cast(g.clone(), d.dtype().into());
            B::float_mul(d, g)
        };
        let (dh, dw) = ops.state;
        if let (Some(node), Some(dh)) = (node_h, dh) {
            grads.register::<B>(node.id, scaled(dh));
        }
        if let (Some(node), Some(dw)) = (node_w, dw) {
            grads.register::<B>(node.id, scaled(dw));
        }
    }
}

#[derive(Debug)]
struct GeluBackward;

impl<B: Pointwise> Backward<B, 1> for GeluBackward {
    /// The input.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let Some(node) = node else { return };
        grads.register::<B>(node.id, B::fused_gelu_grad(ops.state, g));
    }
}

#[derive(Debug)]
struct LayerNormBackward;

impl<B: Pointwise> Backward<B, 3> for LayerNormBackward {
    /// x, gamma, the per-row mean and rstd (f32).
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, gamma, mean, rstd) = ops.state;
        let want = ops.parents.each_ref().map(|n| n.is_some());
        let parts = layer_norm_grads::<B>(x, gamma, mean, rstd, dy, want);
        for (node, grad) in ops.parents.into_iter().zip(parts) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// LayerNorm's gradients w.r.t. x, gamma and beta, each where `want` says, from its input x,
/// gamma, the per-row mean and rstd (f32) of [`Pointwise::layer_norm_stats`] and dy.
pub(crate) fn layer_norm_grads<B: Pointwise>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    mean: FloatTensor<B>,
    rstd: FloatTensor<B>,
    dy: FloatTensor<B>,
    [want_x, want_gamma, want_beta]: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    let d = gamma.shape()[0];
    let gamma_dt: FloatDType = gamma.dtype().into();
    // Σ over the rows of an f32 `[.., d]` -> `[d]` in gamma's dtype.
    let column_sums = |t: FloatTensor<B>| {
        let rows = t.shape().num_elements() / d;
        let s = B::float_sum_dim(B::float_reshape(t, [rows, d].into()), 0);
        B::float_cast(B::float_reshape(s, [d].into()), gamma_dt)
    };
    // dy in f32 once, only where gamma or beta is trained.
    let dy32 = (want_beta || want_gamma).then(|| B::float_cast(dy.clone(), FloatDType::F32));
    let dbeta = dy32.clone().filter(|_| want_beta).map(column_sums);
    let dgamma = dy32.filter(|_| want_gamma).map(|dy32| {
        let xh = normalized::<B>(x.clone(), mean.clone(), rstd.clone());
        column_sums(B::float_mul(dy32, xh))
    });
    let dx = want_x.then(|| B::layer_norm_grad(x, gamma, mean, rstd, dy));
    [dx, dgamma, dbeta]
}

impl<B: Pointwise, C: CheckpointStrategy> GptKernels for Autodiff<B, C> {
    fn causal_attention(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        keep: Keep<Self>,
        n_head: usize,
        scale: f64,
        blocks: Option<usize>,
    ) -> FloatTensor<Self> {
        let prep = AttentionBackward
            .prepare::<C>([qkv.node()])
            .compute_bound()
            .stateful();
        let (qkv, bias) = (qkv.into_primitive(), bias.into_primitive());
        let keep = match keep {
            Keep::Mask(m, p) => Keep::Mask(m.into_primitive(), p),
            Keep::Hashed(seed, p) => Keep::Hashed(seed.into_primitive(), p),
            Keep::All => Keep::All,
        };
        let tracked = matches!(prep, OpsKind::Tracked(_));
        let masked = matches!(keep, Keep::Mask(..));
        let blocks = blocks_for::<B>(blocks, qkv.shape()[1], masked);
        let heads = split_heads::<B>(qkv, n_head, masked, tracked);
        let (out, lse, flash) = attention_forward::<B>(
            &heads,
            bias.clone(),
            keep.clone(),
            scale,
            tracked && B::PROBS_FROM_LSE,
            blocks,
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let dropped = match keep {
                    Keep::Mask(m, p) => Dropped::Mask(KeptMask::pack(m, 1.0 / p)),
                    Keep::Hashed(seed, p) => Dropped::Hashed(seed, p),
                    Keep::All => Dropped::None,
                };
                let [q, ..] = &heads;
                let o = (flash && B::flash_backward_takes(q.shape()[3], q.dtype()))
                    .then(|| out.clone());
                prep.finish((heads, bias, dropped, scale, lse, blocks, o), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let x = x.into_primitive();
        let out = B::fused_gelu(x.clone());
        match prep {
            OpsKind::Tracked(prep) => prep.finish(x, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let prep = LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (x, gamma, beta) = (
            x.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
        );
        let (y, mean, rstd) = B::layer_norm_stats(x.clone(), gamma.clone(), beta, eps);
        match prep {
            OpsKind::Tracked(prep) => prep.finish((x, gamma, mean, rstd), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn linear_cross_entropy(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self> {
        let (grad_h, grad_w) = (h.is_tracked(), w.is_tracked());
        let prep = LinearCeBackward
            .prepare::<C>([h.node(), w.node()])
            .compute_bound()
            .stateful();
        let (h, w, weights) = (
            h.into_primitive(),
            w.into_primitive(),
            weights.into_primitive(),
        );
        // Gradients only where a backward pass will ask for them.
        let tracked = matches!(prep, OpsKind::Tracked(_));
        let (loss, dh, dw) = linear_ce::<B>(
            h,
            w,
            targets,
            weights,
            rows,
            tracked && grad_h,
            tracked && grad_w,
        );
        match prep {
            OpsKind::Tracked(prep) => prep.finish((dh, dw), loss),
            OpsKind::UnTracked(prep) => prep.finish(loss),
        }
    }

    fn nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let prep = NllBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful();
        let x = logits.into_primitive();
        let (out, lse) = nll_forward::<B>(x.clone(), targets.clone());
        match prep {
            OpsKind::Tracked(prep) => prep.finish((x, targets, lse), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// The dropout of [`causal_attention`]'s probabilities.
#[derive(Clone, Debug)]
pub enum AttentionDropout {
    /// The mask `{0, 1/keep}` `[batch, head, seq, seq]` and `keep`.
    Mask(Tensor<4>, f64),
    /// Dropout drawn in the attention kernels from a hash of the seed (`[2]`, f32 uniforms in
    /// `[0, 1)`) and each score's position, and `keep`: no mask is made or kept (cubecl); other
    /// backends make the same mask on the host.
    Hashed(Tensor<1>, f64),
}

/// The dropout `d` applies to attention probabilities `[batch, head, seq, seq]` on `device`:
/// hashed on cubecl devices (GPUs), a mask ([`lora_core::dropout_mask`]) on the host backends;
/// none unless `d` is training on an autodiff device with `prob > 0`.
pub fn attention_dropout(
    d: &Dropout,
    shape: [usize; 4],
    device: &burn::tensor::Device,
    dtype: DType,
) -> Option<AttentionDropout> {
    let keep = 1.0 - d.prob;
    match lora_core::dropout::on_cubecl(device) {
        true => {
            lora_core::dropout::dropout_seed(d, device).map(|s| AttentionDropout::Hashed(s, keep))
        }
        false => lora_core::dropout_mask(d, shape, device, dtype)
            .map(|m| AttentionDropout::Mask(m, keep)),
    }
}

/// [`GptKernels::causal_attention`] on tensors: `qkv [batch, seq, 3·n_head·d]` ->
/// `[batch, head, seq, d]`, with `dropout` on the probabilities.
pub fn causal_attention(
    qkv: Tensor<3>,
    bias: Tensor<4>,
    dropout: Option<AttentionDropout>,
    n_head: usize,
    scale: f64,
) -> Tensor<4> {
    causal_attention_in_blocks(qkv, bias, dropout, n_head, scale, None)
}

/// [`causal_attention`] over `blocks` query blocks (none: the backend's choice); the same values
/// to rounding, the same dropout.
pub fn causal_attention_in_blocks(
    qkv: Tensor<3>,
    bias: Tensor<4>,
    dropout: Option<AttentionDropout>,
    n_head: usize,
    scale: f64,
    blocks: Option<usize>,
) -> Tensor<4> {
    let keep = match dropout {
        Some(AttentionDropout::Mask(m, p)) => Keep::Mask(m.into_dispatch(), p),
        Some(AttentionDropout::Hashed(seed, p)) => Keep::Hashed(seed.into_dispatch(), p),
        None => Keep::All,
    };
    Tensor::from_dispatch(<Dispatch as GptKernels>::causal_attention(
        qkv.into_dispatch(),
        bias.into_dispatch(),
        keep,
        n_head,
        scale,
        blocks,
    ))
}

/// The head's gradients as [`GptKernels::linear_cross_entropy`] computes them on GPUs
/// ([`VocabSlices`]): d `[rows, v]` (the loss's gradient w.r.t. the logits), h `[rows, k]`,
/// w `[k, v]` -> `d·wᵀ [rows, k]` and `hᵀ·d [k, v]`, d sliced as the rows kernel writes it.
pub fn head_grads_in_slices(
    d: Tensor<2>,
    h: Tensor<2>,
    w: Tensor<2>,
    sl: VocabSlices,
) -> (Tensor<2>, Tensor<2>) {
    let [rows, v] = d.dims();
    let d = slice_vocab::<Dispatch>(d.into_dispatch(), sl.kp);
    let rhs = sl.rhs::<Dispatch>(Dispatch::float_transpose(w.into_dispatch()));
    let k = rhs.shape()[2];
    let dh = lora_core::matmul::sum_of_products::<Dispatch>(d.clone(), rhs, [rows, k]);
    let dw = sl.unslice::<Dispatch>(sl.dw_parts::<Dispatch>(h.into_dispatch(), d), v);
    (Tensor::from_dispatch(dh), Tensor::from_dispatch(dw))
}

/// [`GptKernels::nll`] on tensors: logits `[n, vocab]`, targets `[n, 1]` -> `[n, 1]`.
pub fn nll(logits: Tensor<2>, targets: Tensor<2, Int>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as GptKernels>::nll(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// The most bytes of logits [`linear_cross_entropy`] forms at a time, where it can.
const MAX_CHUNK_BYTES: usize = 256 << 20;

/// Mean cross-entropy of the logits `h·w` over the rows whose target is ≥ 0 (PyTorch's
/// `ignore_index=-1`), without the logits: h `[n, d]`, w `[d, vocab]`, targets `[n]` -> `[1]` (f32).
/// See [`GptKernels::linear_cross_entropy`].
pub fn linear_cross_entropy(h: Tensor<2>, w: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    scaled_linear_cross_entropy(h, w, targets, 1.0)
}

/// `scale` times [`linear_cross_entropy`], for a loss scaler. The op computes its gradients in
/// the forward pass, so this is where the scale has to enter: in f16 the logits' gradient is
/// then `scale·(p − y)/n`, as a scaled loss's backward pass gives it in PyTorch. Scaled
/// afterwards, `(p − y)/n` is subnormal in f16 wherever p < 0.125 at 2,048 rows, and zero below
/// p ≈ 1.2·10⁻⁴.
pub fn scaled_linear_cross_entropy(
    h: Tensor<2>,
    w: Tensor<2>,
    targets: Tensor<1, Int>,
    scale: f64,
) -> Tensor<1> {
    // Chunks of rows: each costs a round of kernels (on an H100, 13 chunks of a GPT-2 step at
    // 8 × 1024 tokens made it 25 % slower, 4 chunks 2–5 %), and on GPUs the largest chunk's logits
    // size cubecl's allocator pages (sized to the largest allocation, so the memory reserved
    // grows by that much at a time): four chunks, or the power of two that keeps a chunk's
    // logits within 256 MiB (8 for GPT-2 in f32 at 8 × 1024 tokens: with the LayerNorm + LoRA
    // op, reserved 4,817 -> 4,378 MiB for LoRA c_attn, for ~0.5 ms of GPU time a step), of at
    // least 2²⁵ logits each; and never above what the device binds in one buffer (llvmpipe:
    // 128 MiB).
    let n = targets.dims()[0];
    let v = w.dims()[1].max(1);
    let row_bytes = v * h.dtype().size();
    let max_chunk = lora_core::max_binding_bytes(&h.device())
        .map_or(MAX_CHUNK_BYTES, |limit| MAX_CHUNK_BYTES.min(limit as usize));
    let chunks = (n * row_bytes)
        .div_ceil(max_chunk)
        .next_power_of_two()
        .max(4);
    let rows = ((1usize << 25) / v)
        .max(n.div_ceil(chunks))
        .min(max_chunk / row_bytes)
        .max(1);
    linear_cross_entropy_in_chunks(h, w, targets, rows, scale)
}

/// [`scaled_linear_cross_entropy`], `rows` rows at a time.
pub fn linear_cross_entropy_in_chunks(
    h: Tensor<2>,
    w: Tensor<2>,
    targets: Tensor<1, Int>,
    rows: usize,
    scale: f64,
) -> Tensor<1> {
    let n = targets.dims()[0];
    let targets = targets.reshape([n, 1]);
    let keep = targets.clone().greater_equal_elem(0).float();
    let weights = keep.clone() / keep.sum().div_scalar(scale).reshape([1, 1]);
    Tensor::from_dispatch(<Dispatch as GptKernels>::linear_cross_entropy(
        h.into_dispatch(),
        w.into_dispatch(),
        targets.clamp_min(0).into_dispatch(),
        weights.into_dispatch(),
        rows,
    ))
}

/// [`GptKernels::gelu_tanh`] on tensors.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GptKernels>::gelu_tanh(x.into_dispatch()))
}

/// [`GptKernels::layer_norm`] on tensors: x `[.., d]`, gamma, beta `[d]` -> x's shape and dtype.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GptKernels>::layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}
