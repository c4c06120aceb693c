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
use crate::kernels::{AdapterKernels, MAX_RANK, THIN_MAX};
use crate::matmul::Matmul;
use crate::matmul::THIN_FROM_ROWS;

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

    /// A's gradient from a LayerNorm's input: `gᵀ·drop(ln(x))` `[r, k]`, g `[rows, r]`, `norm`'s
    /// x `[rows, k]` and statistics ([`Normed`]); `drop` as in [`AdapterOps::down`].
    fn normed_tn(
        g: FloatTensor<Self>,
        norm: Normed<Self>,
        seed: FloatTensor<Self>,
        keep: f64,
    ) -> FloatTensor<Self> {
        normed_tn_composed::<Self>(g, norm, seed, keep)
    }
}

/// [`AdapterOps::normed_tn`] in Burn's ops: the norm's output, its dropout, the product.
fn normed_tn_composed<B: Matmul>(
    g: FloatTensor<B>,
    norm: Normed<B>,
    seed: FloatTensor<B>,
    keep: f64,
) -> FloatTensor<B> {
    let y = norm.output();
    let y = match keep < 1.0 {
        true => hashed_mul::<B>(y, seed, keep),
        false => y,
    };
    B::mm_tn(g, y)
}

/// A LayerNorm's output `(x − mean)·rstd·gamma + beta` (computed in f32, rounded to x's dtype)
/// as its backward pass keeps it: its input x `[rows, k]`, the per-row mean and rstd `[rows, 1]`
/// (f32), gamma and beta `[k]`.
#[derive(Debug, Clone)]
pub struct Normed<B: Backend> {
    pub x: FloatTensor<B>,
    pub mean: FloatTensor<B>,
    pub rstd: FloatTensor<B>,
    pub gamma: FloatTensor<B>,
    pub beta: FloatTensor<B>,
}

impl<B: Backend> Normed<B> {
    /// The norm's output `[rows, k]` in Burn's ops.
    pub fn output(self) -> FloatTensor<B> {
        let k = self.gamma.shape()[0];
        let row = |t: FloatTensor<B>| {
            B::float_reshape(B::float_cast(t, FloatDType::F32), Shape::new([1, k]))
        };
        let dt = self.x.dtype();
        let x = B::float_cast(self.x, FloatDType::F32);
        let xh = B::float_mul(B::float_sub(x, self.mean), self.rstd);
        let y = B::float_add(B::float_mul(xh, row(self.gamma)), row(self.beta));
        B::float_cast(y, dt.into())
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

    /// One pass over x ([`AdapterKernels::thin_tn_normed`]) for thin g over many rows, as
    /// [`Matmul::mm_tn`] takes [`AdapterKernels::thin_tn`].
    fn normed_tn(
        g: FloatTensor<Self>,
        norm: Normed<Self>,
        seed: FloatTensor<Self>,
        keep: f64,
    ) -> FloatTensor<Self> {
        let [rows, m] = g.shape().dims::<2>();
        if m <= THIN_MAX && rows >= THIN_FROM_ROWS && g.dtype() == norm.x.dtype() {
            let Normed {
                x,
                mean,
                rstd,
                gamma,
                beta,
            } = norm;
            return <Self as AdapterKernels>::thin_tn_normed(
                g, x, mean, rstd, gamma, beta, seed, keep,
            );
        }
        normed_tn_composed::<Self>(g, norm, seed, keep)
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

/// The gradients a LoRA linear's backward pass computes, in its parents' order: x, w, bias, a, b.
pub type Wanted = [bool; 5];

/// What a LoRA linear's backward pass needs ([`lora_forward`] -> [`lora_backward`]): each tensor
/// only where a wanted gradient needs it. Ops that fuse the layer with what feeds it (lora-gpt's
/// LayerNorm + LoRA) keep it in their own state.
#[derive(Debug, Clone)]
pub struct LoraSaved<B: Backend> {
    /// x (W's gradient), `drop(x)` (A's), xa (B's); x and `drop(x)` none where the caller
    /// recomputes the input for [`lora_backward`].
    x: Option<FloatTensor<B>>,
    xd: Option<FloatTensor<B>>,
    xa: Option<FloatTensor<B>>,
    /// W (x's gradient), A (x's; and A's where `drop(x)` is drawn again), Bᵀ `[r, n]` (x's, A's).
    w: Option<FloatTensor<B>>,
    a: Option<FloatTensor<B>>,
    bt: Option<FloatTensor<B>>,
    /// The dropout's seed and keep probability, the scale, the bias dtype, the gradients wanted.
    seed: FloatTensor<B>,
    keep: f64,
    scale: f64,
    bias_dtype: DType,
    want: Wanted,
}

/// The forward pass of [`LoraKernels::lora_linear`] on an autodiff device: the output `[rows, n]`
/// and what the backward pass needs for the gradients `want` (x, w, bias, a, b; bias only where
/// there is one). With `keep_input` false the layer's input is not kept: the caller recomputes it
/// for [`lora_backward`] (it saves a `[rows, k]` tensor per layer where the caller keeps what
/// the input comes from anyway).
#[allow(clippy::too_many_arguments)]
pub fn lora_forward<B: AdapterOps>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    seed: FloatTensor<B>,
    keep: f64,
    scale: f64,
    want: Wanted,
    keep_input: bool,
) -> (FloatTensor<B>, LoraSaved<B>) {
    let [gx, gw, _, ga, gb] = want;
    let bias_dtype = bias.as_ref().map_or(DType::F32, |b| b.dtype());
    let (out, xa, xd, bt) = forward::<B>(
        x.clone(),
        w.clone(),
        bias,
        a.clone(),
        b,
        seed.clone(),
        keep,
        scale,
        keep_input && ga && keep < 1.0,
    );
    let saved = LoraSaved {
        xd: (keep_input && ga).then(|| xd.unwrap_or_else(|| x.clone())),
        x: (keep_input && gw).then_some(x),
        xa: gb.then_some(xa),
        w: gx.then_some(w),
        a: (gx || (ga && !keep_input)).then_some(a),
        bt: (gx || ga).then_some(bt),
        seed,
        keep,
        scale,
        bias_dtype,
        want,
    };
    (out, saved)
}

/// The layer's input for [`lora_backward`] where [`lora_forward`] did not keep it.
#[derive(Debug, Clone)]
pub enum Input<B: Backend> {
    /// Kept by the forward pass.
    Kept,
    /// Recomputed by the caller `[rows, k]`.
    Given(FloatTensor<B>),
    /// A LayerNorm's output, from what the norm keeps: A's gradient reads the norm's input
    /// directly ([`AdapterOps::normed_tn`]); W's gradient needs [`Input::Given`].
    Normed(Normed<B>),
}

/// The gradients of [`lora_forward`]'s output w.r.t. x, w, bias, a, b from dy `[rows, n]`, each
/// where it was wanted: `g = s·dy·B`, `dB = dyᵀ·xa`, `dA = gᵀ·drop(x)`, `dW = xᵀ·dy`,
/// `dbias = Σ dy`, `dx = dy·Wᵀ + drop(g·A)`; `input` where the forward pass did not keep it.
pub fn lora_backward<B: AdapterOps>(
    s: LoraSaved<B>,
    dy: FloatTensor<B>,
    input: Input<B>,
) -> [Option<FloatTensor<B>>; 5] {
    let [gx, gw, gbias, ga, gb] = s.want;
    // g = s·dy·B `[rows, r]`: A's and x's gradients.
    let g = (gx || ga).then(|| {
        let bt = s.bt.clone().expect("kept for x and A");
        B::down(dy.clone(), bt, s.seed.clone(), s.scale, 1.0, false).0
    });
    // dB = dyᵀ·xa `[n, r]`, as `(xaᵀ·dy)ᵀ`.
    let db =
        s.xa.filter(|_| gb)
            .map(|xa| B::float_transpose(B::mm_tn(xa, dy.clone())));
    let da = match (ga, s.xd, &g) {
        (true, Some(xd), Some(g)) => Some(B::mm_tn(g.clone(), xd)),
        // drop(x) drawn again from the seed, as the forward pass's kernel drew it.
        (true, None, Some(g)) => match &input {
            Input::Given(x) if s.keep < 1.0 => {
                let a = s.a.clone().expect("kept to draw drop(x) again");
                let xd = B::down(x.clone(), a, s.seed.clone(), 1.0, s.keep, true).1;
                Some(B::mm_tn(g.clone(), xd.expect("drop(x)")))
            }
            Input::Given(x) => Some(B::mm_tn(g.clone(), x.clone())),
            Input::Normed(norm) => Some(B::normed_tn(
                g.clone(),
                norm.clone(),
                s.seed.clone(),
                s.keep,
            )),
            Input::Kept => panic!("A's gradient without the layer's input"),
        },
        _ => None,
    };
    let given = match input {
        Input::Given(x) => Some(x),
        _ => None,
    };
    let dw = match gw {
        true => Some(B::mm_tn(
            s.x.or(given)
                .expect("W's gradient without the layer's input"),
            dy.clone(),
        )),
        false => None,
    };
    let dbias = gbias.then(|| {
        // Σ over the rows in f32.
        let n = dy.shape()[1];
        let sum = B::float_sum_dim(B::float_cast(dy.clone(), FloatDType::F32), 0);
        let sum = B::float_reshape(sum, Shape::new([n]));
        B::float_cast(sum, s.bias_dtype.into())
    });
    let dx = match (gx, s.w, s.a, g) {
        (true, Some(w), Some(a), Some(g)) => {
            let dx = B::mm(dy, B::float_transpose(w));
            Some(B::up(dx, None, g, a, s.seed, s.keep))
        }
        _ => None,
    };
    [dx, dw, dbias, da, db]
}

#[derive(Debug)]
struct LoraLinearBackward;

impl<B: AdapterOps> Backward<B, 5> for LoraLinearBackward {
    type State = LoraSaved<B>;

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let parts = lora_backward::<B>(ops.state, dy, Input::Kept);
        for (node, grad) in ops.parents.into_iter().zip(parts) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
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
        let want = [
            x.is_tracked(),
            w.is_tracked(),
            with_bias && bias.is_tracked(),
            a.is_tracked(),
            b.is_tracked(),
        ];
        let prep = LoraLinearBackward
            .prepare::<C>([x.node(), w.node(), bias.node(), a.node(), b.node()])
            .compute_bound()
            .stateful();
        let [x, w, bias, a, b, seed] = [x, w, bias, a, b, seed].map(|t| t.into_primitive());
        let bias = with_bias.then_some(bias);
        let (out, saved) = lora_forward::<B>(x, w, bias, a, b, seed, keep, scale, want, true);
        match prep {
            OpsKind::Tracked(prep) => prep.finish(saved, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// A LoRA linear's tensors as [`lora_linear`] takes them (in the input's dtype): w `[k, n]`,
/// bias `[n]`, a `[r, k]`, b `[n, r]`, the dropout's seed `[2]` where it drops
/// ([`crate::dropout::dropout_seed`]) and its keep probability, the scale.
#[derive(Debug, Clone)]
pub struct LoraParts {
    pub weight: Tensor<2>,
    pub bias: Option<Tensor<1>>,
    pub a: Tensor<2>,
    pub b: Tensor<2>,
    pub seed: Option<Tensor<1>>,
    pub keep: f64,
    pub scale: f64,
}

/// [`LoraParts`] as backend ops take them ([`LoraKernels::lora_linear`]'s arguments after x):
/// primitives, with stand-ins the op never reads for the seed without dropout (`keep` 1) and
/// the bias without one.
pub struct LoraOpArgs {
    pub w: FloatTensor<Dispatch>,
    pub bias: FloatTensor<Dispatch>,
    pub a: FloatTensor<Dispatch>,
    pub b: FloatTensor<Dispatch>,
    pub seed: FloatTensor<Dispatch>,
    pub keep: f64,
    pub scale: f64,
    pub with_bias: bool,
}

impl LoraParts {
    /// `x·w + bias + scale·(drop(x)·aᵀ)·bᵀ` for x `[..., k]` -> `[..., n]` ([`lora_linear`]).
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        let args = self.op_args();
        over_rows(x, |x| {
            Tensor::from_dispatch(<Dispatch as LoraKernels>::lora_linear(
                x.into_dispatch(),
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

    /// The op's arguments ([`LoraOpArgs`]).
    pub fn op_args(self) -> LoraOpArgs {
        let a = self.a;
        // Stand-ins: A's values, untracked (an empty tensor would be memory never written, which
        // cubecl's fusion rejects).
        let stand_in = || a.clone().detach().set_require_grad(false).reshape([-1]);
        let (seed, keep) = match self.seed {
            Some(seed) => (seed, self.keep),
            None => (stand_in(), 1.0),
        };
        let with_bias = self.bias.is_some();
        let bias = self.bias.unwrap_or_else(stand_in);
        LoraOpArgs {
            w: self.weight.into_dispatch(),
            bias: bias.into_dispatch(),
            a: a.into_dispatch(),
            b: self.b.into_dispatch(),
            seed: seed.into_dispatch(),
            keep,
            scale: self.scale,
            with_bias,
        }
    }
}

/// `f` on x `[..., k]` as `[rows, k]` -> `[rows, n]`, back to `[..., n]`.
pub fn over_rows<const D: usize>(
    x: Tensor<D>,
    f: impl FnOnce(Tensor<2>) -> Tensor<2>,
) -> Tensor<D> {
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = f(x.reshape([rows, dims[D - 1]]));
    dims[D - 1] = y.dims()[1];
    y.reshape(dims)
}

/// `x·w + bias + scale·(drop(x)·aᵀ)·bᵀ` ([`LoraKernels::lora_linear`]) for x `[..., k]`, as one
/// `[rows, k]` product: w `[k, n]`, bias `[n]`, a `[r, k]`, b `[n, r]`; dropout where `seed`
/// (`[2]`, [`crate::dropout::dropout_seed`]) is given, keeping each element with probability `keep`.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    a: Tensor<2>,
    b: Tensor<2>,
    seed: Option<Tensor<1>>,
    keep: f64,
    scale: f64,
) -> Tensor<D> {
    let parts = LoraParts {
        weight,
        bias,
        a,
        b,
        seed,
        keep,
        scale,
    };
    parts.forward(x)
}
