//! LayerNorm followed by a LoRA linear, `lora(ln(x))`, as one autodiff op: `ln_1` + `c_attn` and
//! `ln_2` + `c_fc` of a block whose linear has an adapter.
//!
//! Apart, the two ops keep two `[rows, d]` tensors for the backward pass: LayerNorm its input x,
//! and the LoRA layer its (dropped) input `drop(ln(x))` for A's gradient `gᵀ·drop(ln(x))`. Together
//! the op keeps x (and the per-row mean and rstd), and A's gradient draws `ln(x)` and its dropout
//! again as the forward pass's kernels drew them, in the same pass over x that sums the product
//! (`AdapterOps::normed_tn`, one kernel on GPUs): 24 MiB a layer less for GPT-2 small at
//! 8 × 1024 tokens in f32. Where W is trained, its gradient takes `ln(x)` whole (the norm's
//! kernel again).

#![allow(deprecated)] // `NdArray`: deprecated upstream, still one of our backends.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, Dispatch, Flex, NdArray, backend_extension};
use burn::tensor::Tensor;
use lora_core::fused::{
    AdapterOps, Input, LoraKernels, LoraParts, LoraSaved, Normed, lora_backward, lora_forward,
    over_rows,
};

use crate::fused::{Pointwise, layer_norm_grads};

/// The fused op per backend.
#[backend_extension(Cube, Flex, NdArray, Autodiff)]
pub trait NormLoraKernels: Backend {
    /// `lora(ln(x))`: x `[rows, k]`, gamma, beta `[k]` (LayerNorm, `eps`, computed in f32), then
    /// [`LoraKernels::lora_linear`]'s `w, bias, a, b, seed, keep, scale, with_bias` -> `[rows, n]`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_lora_linear(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        w: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        keep: f64,
        scale: f64,
        with_bias: bool,
    ) -> FloatTensor<Self>;
}

macro_rules! plain_backend {
    ($($b:ty),*) => {$(
        impl NormLoraKernels for $b {
            fn layer_norm_lora_linear(
                x: FloatTensor<Self>,
                gamma: FloatTensor<Self>,
                beta: FloatTensor<Self>,
                eps: f64,
                w: FloatTensor<Self>,
                bias: FloatTensor<Self>,
                a: FloatTensor<Self>,
                b: FloatTensor<Self>,
                seed: FloatTensor<Self>,
                keep: f64,
                scale: f64,
                with_bias: bool,
            ) -> FloatTensor<Self> {
                let y = Self::layer_norm_stats(x, gamma, beta, eps).0;
                Self::lora_linear(y, w, bias, a, b, seed, keep, scale, with_bias)
            }
        }
    )*};
}

plain_backend!(Cube, Flex, NdArray);

/// LayerNorm's input, gamma, beta, per-row mean and rstd, eps; whether W is trained (its
/// gradient takes `ln(x)` whole); the LoRA layer's part.
type NormLoraState<B> = ([FloatTensor<B>; 5], f64, bool, LoraSaved<B>);

#[derive(Debug)]
struct NormLoraBackward;

impl<B: Pointwise + AdapterOps> Backward<B, 7> for NormLoraBackward {
    type State = NormLoraState<B>;

    fn backward(self, ops: Ops<Self::State, 7>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let ([x, gamma, beta, mean, rstd], eps, base_trained, lora) = ops.state;
        let [node_x, node_gamma, node_beta, lora_nodes @ ..] = ops.parents;
        // W's gradient takes ln(x) whole; A's alone reads x in its one pass.
        let input = match base_trained {
            true => Input::Given(B::layer_norm_stats(x.clone(), gamma.clone(), beta, eps).0),
            false => Input::Normed(Normed {
                x: x.clone(),
                mean: mean.clone(),
                rstd: rstd.clone(),
                gamma: gamma.clone(),
                beta,
            }),
        };
        let [dy_ln, lora_grads @ ..] = lora_backward::<B>(lora, dy, input);
        for (node, grad) in lora_nodes.into_iter().zip(lora_grads) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
        let Some(dy_ln) = dy_ln else { return };
        let ln_nodes = [node_x, node_gamma, node_beta];
        let want = ln_nodes.each_ref().map(|n| n.is_some());
        let ln_grads = layer_norm_grads::<B>(x, gamma, mean, rstd, dy_ln, want);
        for (node, grad) in ln_nodes.into_iter().zip(ln_grads) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: Pointwise + AdapterOps, C: CheckpointStrategy> NormLoraKernels for Autodiff<B, C> {
    fn layer_norm_lora_linear(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        w: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        keep: f64,
        scale: f64,
        with_bias: bool,
    ) -> FloatTensor<Self> {
        let ln_want = [&x, &gamma, &beta].map(|t| t.is_tracked());
        let want = [
            ln_want.contains(&true),
            w.is_tracked(),
            with_bias && bias.is_tracked(),
            a.is_tracked(),
            b.is_tracked(),
        ];
        let prep = NormLoraBackward
            .prepare::<C>([
                x.node(),
                gamma.node(),
                beta.node(),
                w.node(),
                bias.node(),
                a.node(),
                b.node(),
            ])
            .compute_bound()
            .stateful();
        let [x, gamma, beta, w, bias, a, b, seed] =
            [x, gamma, beta, w, bias, a, b, seed].map(|t| t.into_primitive());
        let (y, mean, rstd) = B::layer_norm_stats(x.clone(), gamma.clone(), beta.clone(), eps);
        let bias = with_bias.then_some(bias);
        let (out, lora) = lora_forward::<B>(y, w, bias, a, b, seed, keep, scale, want, false);
        match prep {
            OpsKind::Tracked(prep) => {
                prep.finish(([x, gamma, beta, mean, rstd], eps, want[1], lora), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// `lora(ln(x))` ([`NormLoraKernels::layer_norm_lora_linear`]) for x `[..., k]`: LayerNorm with
/// gamma, beta `[k]` and `eps`, then the LoRA linear of `lora` ([`LoraParts`]) -> `[..., n]`.
pub fn layer_norm_lora_linear<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
    lora: LoraParts,
) -> Tensor<D> {
    let args = lora.op_args();
    over_rows(x, |x| {
        Tensor::from_dispatch(<Dispatch as NormLoraKernels>::layer_norm_lora_linear(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            eps,
            args.w,
            args.bias,
            args.a,
            args.b,
            args.seed,
            args.keep,
            args.scale,
            args.with_bias,
        ))
    })
}
