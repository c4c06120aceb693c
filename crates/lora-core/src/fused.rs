//! The LoRA linear `x·W + bias + s·(drop(x)·Aᵀ)·Bᵀ` as one autodiff op ([`lora_linear`]): what
//! [`crate::LoraLinear`] runs when training on a cubecl device (wgpu, vulkan).
//!
//! Its backward pass computes only the gradients asked for (usually A's and B's and x's, with W
//! frozen): `g = s·dy·B`, `dB = dyᵀ·xa`, `dA = gᵀ·drop(x)`, `dx = dy·Wᵀ + drop(g·A)`, with
//! `xa = s·drop(x)·Aᵀ` kept from the forward pass, and keeps only what they need. The adapter's
//! thin products run as the kernels of [`crate::kernels`] on GPUs (dropout drawn inside them,
//! [`crate::dropout::hashed`]'s mask); elsewhere as Burn's ops.

#![allow(deprecated)] // `NdArray`: deprecated upstream, still one of our backends.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, Dispatch, Flex, NdArray, backend_extension};
use burn::tensor::{DType, FloatDType, Shape, Tensor};

use crate::dropout::hashed_mul;
use crate::kernels::{AdapterKernels, MAX_RANK};
use crate::matmul::Matmul;

/// The adapter's two thin products on a backend; Burn's ops unless a backend has kernels.
pub trait AdapterOps: Matmul {
    /// x `[rows, k]`, a `[r, k]` -> `xa = scale·drop(x)·aᵀ` `[rows, r]` and, with `dropped`,
    /// `drop(x)`; `drop` hashed dropout from `seed` `[2]` (f32) where `keep < 1`.
    fn down(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
        dropped: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        down_composed::<Self>(x, a, seed, scale, keep, dropped)
    }

    /// base `[rows, n]`, bias `[n]`, xa `[rows, r]`, bt `[r, n]` -> `base + bias + drop(xa·bt)`,
    /// `drop` as in [`AdapterOps::down`] (over `[rows, n]`).
    fn up(
        base: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        xa: FloatTensor<Self>,
        bt: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        keep: f64,
    ) -> FloatTensor<Self> {
        up_composed::<Self>(base, bias, xa, bt, seed, keep)
    }
}

/// [`AdapterOps::up`] in Burn's ops.
fn up_composed<B: Matmul>(
    base: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    xa: FloatTensor<B>,
    bt: FloatTensor<B>,
    seed: FloatTensor<B>,
    keep: f64,
) -> FloatTensor<B> {
    let n = base.shape()[1];
    let base = match bias {
        Some(b) => B::float_add(base, B::float_reshape(b, Shape::new([1, n]))),
        None => base,
    };
    let t = B::mm(xa, bt);
    let t = match keep < 1.0 {
        true => hashed_mul::<B>(t, seed, keep),
        false => t,
    };
    B::float_add(base, t)
}

/// [`AdapterOps::down`] in Burn's ops.
fn down_composed<B: Matmul>(
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    seed: FloatTensor<B>,
    scale: f64,
    keep: f64,
    dropped: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let xd = match keep < 1.0 {
        true => hashed_mul::<B>(x, seed, keep),
        false => x,
    };
    let xa = B::mm(xd.clone(), B::float_transpose(a));
    (B::float_mul_scalar(xa, scale.into()), dropped.then_some(xd))
}

impl AdapterOps for Flex {}
impl AdapterOps for NdArray {}

impl AdapterOps for Cube {
    /// One kernel ([`crate::kernels`]) up to rank [`MAX_RANK`].
    fn down(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
        dropped: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if a.shape()[0] > MAX_RANK {
            return down_composed::<Self>(x, a, seed, scale, keep, dropped);
        }
        match dropped {
            true => {
                let (xa, xd) = <Self as AdapterKernels>::lora_down_dropped(x, a, seed, scale, keep);
                (xa, Some(xd))
            }
            false => (
                <Self as AdapterKernels>::lora_down(x, a, seed, scale, keep),
                None,
            ),
        }
    }

    /// One kernel ([`crate::kernels`]) up to rank [`MAX_RANK`].
    fn up(
        base: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        xa: FloatTensor<Self>,
        bt: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        keep: f64,
    ) -> FloatTensor<Self> {
        if xa.shape()[1] > MAX_RANK {
            return up_composed::<Self>(base, bias, xa, bt, seed, keep);
        }
        // Without a bias, xa stands in (never read).
        let with_bias = bias.is_some();
        let bias = bias.unwrap_or_else(|| xa.clone());
        <Self as AdapterKernels>::lora_up(base, bias, xa, bt, seed, keep, with_bias)
    }
}

/// The fused LoRA linear per backend.
#[backend_extension(Cube, Flex, NdArray, Autodiff)]
pub trait LoraKernels: Backend {
    /// `x·w + bias + scale·(drop(x)·aᵀ)·bᵀ`: x `[rows, k]`, w `[k, n]`, bias `[n]` (read only
    /// `with_bias`), a `[r, k]`, b `[n, r]` (all in x's dtype) -> `[rows, n]`; `drop` hashed
    /// dropout ([`crate::dropout::hashed`]) from `seed` `[2]` (f32 uniforms) where `keep < 1`.
    #[allow(clippy::too_many_arguments)]
    fn lora_linear(
        x: FloatTensor<Self>,
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

/// The forward pass: `(out, xa, drop(x) where asked for, Bᵀ)`.
#[allow(clippy::too_many_arguments)]
fn forward<B: AdapterOps>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    seed: FloatTensor<B>,
    keep: f64,
    scale: f64,
    dropped: bool,
) -> (
    FloatTensor<B>,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
    FloatTensor<B>,
) {
    let y = B::mm(x.clone(), w);
    let (xa, xd) = B::down(x, a, seed.clone(), scale, keep, dropped);
    let bt = transposed::<B>(b);
    let out = B::up(y, bias, xa.clone(), bt.clone(), seed, 1.0);
    (out, xa, xd, bt)
}

/// `bᵀ` laid out in rows (`[n, r]` -> `[r, n]`, through a 1-d reshape, which copies the
/// transposed view): the kernels read it so, in the forward pass and again in the backward pass.
fn transposed<B: Backend>(b: FloatTensor<B>) -> FloatTensor<B> {
    let [n, r] = b.shape().dims::<2>();
    let flat = B::float_reshape(B::float_transpose(b), Shape::new([n * r]));
    B::float_reshape(flat, Shape::new([r, n]))
}

macro_rules! plain_backend {
    ($($b:ty),*) => {$(
        impl LoraKernels for $b {
            fn lora_linear(
                x: FloatTensor<Self>,
                w: FloatTensor<Self>,
                bias: FloatTensor<Self>,
                a: FloatTensor<Self>,
                b: FloatTensor<Self>,
                seed: FloatTensor<Self>,
                keep: f64,
                scale: f64,
                with_bias: bool,
            ) -> FloatTensor<Self> {
                let bias = with_bias.then_some(bias);
                forward::<Self>(x, w, bias, a, b, seed, keep, scale, false).0
            }
        }
    )*};
}

plain_backend!(Cube, Flex, NdArray);

/// What the backward pass keeps: each only where a gradient needs it.
#[derive(Debug, Clone)]
struct LoraState<B: Backend> {
    /// x (W's gradient), `drop(x)` (A's), xa (B's).
    x: Option<FloatTensor<B>>,
    xd: Option<FloatTensor<B>>,
    xa: Option<FloatTensor<B>>,
    /// W (x's gradient), A (x's), Bᵀ `[r, n]` (x's and A's).
    w: Option<FloatTensor<B>>,
    a: Option<FloatTensor<B>>,
    bt: Option<FloatTensor<B>>,
    /// The dropout's seed and keep probability, the scale, the bias dtype, whether there is one.
    seed: FloatTensor<B>,
    keep: f64,
    scale: f64,
    bias_dtype: DType,
    with_bias: bool,
}

#[derive(Debug)]
struct LoraLinearBackward;

impl<B: AdapterOps> Backward<B, 5> for LoraLinearBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_bias, node_a, node_b] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let s = ops.state;
        // g = s·dy·B `[rows, r]`: A's and x's gradients.
        let g = match (&node_x, &node_a) {
            (None, None) => None,
            _ => {
                let bt = s.bt.clone().expect("kept for x and A");
                Some(B::down(dy.clone(), bt, s.seed.clone(), s.scale, 1.0, false).0)
            }
        };
        if let (Some(node), Some(xa)) = (node_b, s.xa) {
            // dB = dyᵀ·xa `[n, r]`, as `(xaᵀ·dy)ᵀ`.
            grads.register::<B>(node.id, B::float_transpose(B::mm_tn(xa, dy.clone())));
        }
        if let (Some(node), Some(xd), Some(g)) = (node_a, s.xd, &g) {
            grads.register::<B>(node.id, B::mm_tn(g.clone(), xd));
        }
        if let (Some(node), Some(x)) = (node_w, s.x) {
            grads.register::<B>(node.id, B::mm_tn(x, dy.clone()));
        }
        if let (Some(node), true) = (node_bias, s.with_bias) {
            // Σ over the rows in f32.
            let n = dy.shape()[1];
            let sum = B::float_sum_dim(B::float_cast(dy.clone(), FloatDType::F32), 0);
            let sum = B::float_reshape(sum, Shape::new([n]));
            grads.register::<B>(node.id, B::float_cast(sum, s.bias_dtype.into()));
        }
        if let (Some(node), Some(w), Some(a), Some(g)) = (node_x, s.w, s.a, g) {
            let dx = B::mm(dy, B::float_transpose(w));
            grads.register::<B>(node.id, B::up(dx, None, g, a, s.seed, s.keep));
        }
    }
}

impl<B: AdapterOps, C: CheckpointStrategy> LoraKernels for Autodiff<B, C> {
    fn lora_linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        keep: f64,
        scale: f64,
        with_bias: bool,
    ) -> FloatTensor<Self> {
        let [gx, gw, ga, gb] = [&x, &w, &a, &b].map(|t| t.is_tracked());
        let prep = LoraLinearBackward
            .prepare::<C>([x.node(), w.node(), bias.node(), a.node(), b.node()])
            .compute_bound()
            .stateful();
        let bias_dtype = bias.dtype();
        let [x, w, bias, a, b, seed] = [x, w, bias, a, b, seed].map(|t| t.into_primitive());
        let bias = with_bias.then_some(bias);
        let dropped = ga && keep < 1.0;
        let (out, xa, xd, bt) = forward::<B>(
            x.clone(),
            w.clone(),
            bias,
            a.clone(),
            b,
            seed.clone(),
            keep,
            scale,
            dropped,
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let state = LoraState {
                    xd: ga.then(|| xd.unwrap_or_else(|| x.clone())),
                    x: gw.then_some(x),
                    xa: gb.then_some(xa),
                    w: gx.then_some(w),
                    a: gx.then_some(a),
                    bt: (gx || ga).then_some(bt),
                    seed,
                    keep,
                    scale,
                    bias_dtype,
                    with_bias,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// `x·w + bias + scale·(drop(x)·aᵀ)·bᵀ` ([`LoraKernels::lora_linear`]) for x `[..., k]`, as one
/// `[rows, k]` product: w `[k, n]`, bias `[n]`, a `[r, k]`, b `[n, r]`; dropout where `seed`
/// (`[2]`, [`crate::dropout::dropout_seed`]) is given, keeping each element with probability `keep`.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear<const D: usize>(
    x: Tensor<D>,
    w: Tensor<2>,
    bias: Option<Tensor<1>>,
    a: Tensor<2>,
    b: Tensor<2>,
    seed: Option<Tensor<1>>,
    keep: f64,
    scale: f64,
) -> Tensor<D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let n = w.dims()[1];
    // Stand-ins the op never reads (the seed without dropout, the bias without one): A's values,
    // untracked (an empty tensor would be memory never written, which cubecl's fusion rejects).
    let stand_in = || a.clone().detach().set_require_grad(false).reshape([-1]);
    let (seed, keep) = match seed {
        Some(seed) => (seed, keep),
        None => (stand_in(), 1.0),
    };
    let with_bias = bias.is_some();
    let bias = bias.unwrap_or_else(stand_in);
    let y = Tensor::<2>::from_dispatch(<Dispatch as LoraKernels>::lora_linear(
        x.reshape([rows, k]).into_dispatch(),
        w.into_dispatch(),
        bias.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        seed.into_dispatch(),
        keep,
        scale,
        with_bias,
    ));
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}
