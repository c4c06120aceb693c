//! Dropout with cheaper masks on host (CPU) backends, and a dropout product that keeps its mask
//! packed for the backward pass.
//!
//! Burn's `Dropout::forward` draws one Bernoulli sample per element from the backend's ChaCha
//! generator (a sampler built per element) and scales in a second pass: on the CPU backends that
//! was ~23 ns per element, a fifth of a minGPT training step. Two cheaper masks, both applied in
//! one multiply and both a function of `device.seed(..)`:
//! - [`dropout_mask`] / [`dropout_folded`] (the GPT's dropouts): Burn's own mask, bit for bit; on
//!   flex from the same generator's raw draws, thresholded here (a third of the cost).
//! - [`dropout`] (LoRA's input dropout): one draw from the device RNG seeds a xoshiro generator
//!   that fills the mask (~12× cheaper; another stream than Burn's).
//!
//! Devices with their own RNG kernels (GPUs) use Burn's draws. The multiply is [`masked`]: one
//! autodiff node whose backward pass keeps the mask as bits ([`KeptMask`]), where Burn's `x · mask`
//! keeps it in floats (GPT-2 small at 8 × 1024: 37 masks of 25 MB).

#![allow(deprecated)] // `NdArray`: deprecated upstream, still one of our backends.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Cube, Dispatch, Flex, NdArray, backend_extension};
use burn::nn::Dropout;
use burn::tensor::{DType, Device, Distribution, Int, Shape, Tensor, TensorData};
use burn::tensor::{FloatDType, IntDType};
use rand::{RngCore, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether `device` runs on cubecl (a GPU, or its CPU runtime): its own RNG and matmul kernels.
pub(crate) fn on_cubecl(device: &Device) -> bool {
    device.identity().is_some()
}

/// Whether `d` drops anything on `device`: training, `prob > 0`, an autodiff device (Burn's rule).
fn active(d: &Dropout, device: &Device) -> bool {
    d.training.is_enabled() && d.prob != 0.0 && device.is_autodiff()
}

/// The `{0, 1/keep}` mask [`dropout_folded`] multiplies a `shape`, `dtype` tensor on `device` by
/// (Burn's draws), or `None` where `d` drops nothing. For ops that take the mask as an input
/// (fused attention).
pub fn dropout_mask<const D: usize>(
    d: &Dropout,
    shape: impl Into<Shape>,
    device: &Device,
    dtype: DType,
) -> Option<Tensor<D>> {
    if !active(d, device) {
        return None;
    }
    let keep = 1.0 - d.prob;
    if dtype == DType::F32 && *device == Device::flex() {
        return Some(flex_mask(shape.into(), keep, device));
    }
    // The mask is {0, 1}: x·(m/keep) rounds exactly as Burn's (x·m)·(1/keep).
    let mask = Tensor::random(shape, Distribution::Bernoulli(keep), (device, dtype));
    Some(mask.mul_scalar(1.0 / keep))
}

/// Flex's `Bernoulli(keep)` mask times `1/keep`, from the same draws at a third of the cost.
///
/// Flex samples `Bernoulli(keep)` per element through a sampler built per element (rand's rule:
/// `next_u64() < ⌊keep·2⁶⁴⌋`); its `i64` uniform draws are those `next_u64()` values, one per
/// element from the same generator, so thresholding them here gives Burn's mask bit for bit
/// (a test compares the two).
fn flex_mask<const D: usize>(shape: Shape, keep: f64, device: &Device) -> Tensor<D> {
    let draws =
        Tensor::<D, Int>::random(shape.clone(), Distribution::Default, (device, DType::I64))
            .into_data();
    // rand's `Bernoulli::new` for `0 < p < 1` (`active` and Burn's config bound `p`).
    let p_int = (keep * 18_446_744_073_709_551_616.0) as u64;
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = draws
        .as_slice::<i64>()
        .expect("i64 draws")
        .iter()
        .map(|&v| if (v as u64) < p_int { scale } else { 0.0 })
        .collect();
    Tensor::from_data(TensorData::new(mask, shape), device)
}

/// Burn's `Dropout::forward` with the same draws and the same values (forward and gradient),
/// the `1/keep` scale folded into the mask: one differentiable multiply instead of two.
pub fn dropout_folded<const D: usize>(d: &Dropout, x: Tensor<D>) -> Tensor<D> {
    match dropout_mask(d, x.shape(), &x.device(), x.dtype()) {
        Some(mask) => masked(x, mask, 1.0 - d.prob),
        None => x,
    }
}

/// `d` applied to `x` (identity unless `d` is training on an autodiff device with `prob > 0`).
pub fn dropout<const D: usize>(d: &Dropout, x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    if !active(d, &device) {
        return x;
    }
    if on_cubecl(&device) {
        return dropout_folded(d, x);
    }
    let keep = 1.0 - d.prob;
    // 48 bits of seed from the device generator (f32 uniforms carry 24 bits each).
    let u = Tensor::<1>::random([2], Distribution::Default, &device)
        .into_data()
        .iter::<f32>()
        .map(|v| (v as f64 * (1u64 << 24) as f64) as u64)
        .collect::<Vec<_>>();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(u[0] | (u[1] << 24));
    let threshold = (keep * 4_294_967_296.0) as u64; // keep when a 32-bit draw is below
    let scale = (1.0 / keep) as f32;
    let shape = x.shape();
    let n = shape.num_elements();
    let mut mask = Vec::with_capacity(n + 1);
    while mask.len() < n {
        let r = rng.next_u64();
        for half in [r & 0xffff_ffff, r >> 32] {
            mask.push(if half < threshold { scale } else { 0.0 });
        }
    }
    mask.truncate(n);
    let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &device);
    let dtype = x.dtype();
    masked(x, crate::cast_to(mask, dtype), keep)
}

/// Bits of the dropout mask per packed word (an `i32` holds 16 without reaching its sign bit).
const MASK_BITS: usize = 16;

/// Whether [`KeptMask::pack`] packs (see [`set_packed_masks`]).
static PACKED_MASKS: AtomicBool = AtomicBool::new(true);

/// Whether the backward passes of [`masked`] and of other ops that keep a dropout mask keep it as
/// bits (`true`, the default) or as it is (`false`: 16× the memory, no packing ops), for the whole
/// process from the next op on.
pub fn set_packed_masks(packed: bool) {
    PACKED_MASKS.store(packed, Ordering::Relaxed);
}

/// Masks smaller than this are kept as they are: packing them would save little memory for the
/// time of its ~8 small ops (the sort demo's are 23,232 scores).
const PACK_MIN: usize = 1 << 16;

/// A dropout mask as a backward pass keeps it: one bit per element, 16 to an `i32` (`[n / 16, 1]`,
/// 1/16 of an f32 mask: GPT-2 small's attention masks at 8 × 1024 are 300 MB for 12 layers, not
/// 4.8 GB), or the mask itself where its element count is not a multiple of 16 or below
/// `PACK_MIN` (65,536), or where [`set_packed_masks`] turned packing off.
#[derive(Clone, Debug)]
pub enum KeptMask<B: Backend> {
    /// The bits, and what [`KeptMask::unpack`] rebuilds the mask with.
    Packed {
        /// `[n / 16, 1]`.
        bits: IntTensor<B>,
        /// The mask's shape.
        shape: Shape,
        /// The kept entries' value, `1/keep`.
        value: f64,
        /// The mask's float type.
        dtype: FloatDType,
    },
    /// The mask as it is.
    Dense(FloatTensor<B>),
}

impl<B: Backend> KeptMask<B> {
    /// The mask `{0, value}` packed: bit i of word w is element `16·w + i` ≠ 0.
    pub fn pack(mask: FloatTensor<B>, value: f64) -> Self {
        let shape = mask.shape();
        let n = shape.num_elements();
        if !n.is_multiple_of(MASK_BITS) || n < PACK_MIN || !PACKED_MASKS.load(Ordering::Relaxed) {
            return KeptMask::Dense(mask);
        }
        let dtype = FloatDType::from(mask.dtype());
        let device = mask.device();
        let ones = B::float_into_int(B::float_sign(mask), IntDType::I32);
        let ones = B::int_reshape(ones, Shape::new([n / MASK_BITS, MASK_BITS]));
        let weights = (0..MASK_BITS).map(|i| 1i32 << i).collect::<Vec<_>>();
        let weights = B::int_from_data(TensorData::new(weights, [1, MASK_BITS]), &device);
        let bits = B::int_sum_dim(B::int_mul(ones, weights), 1);
        KeptMask::Packed {
            bits,
            shape,
            value,
            dtype,
        }
    }

    /// The `{0, value}` mask again, bit for bit the one packed.
    pub fn unpack(self) -> FloatTensor<B> {
        match self {
            KeptMask::Dense(mask) => mask,
            KeptMask::Packed {
                bits,
                shape,
                value,
                dtype,
            } => {
                let device = bits.device();
                let shifts = (0..MASK_BITS as i32).collect::<Vec<_>>();
                let shifts = B::int_from_data(TensorData::new(shifts, [1, MASK_BITS]), &device);
                let ones = B::bitwise_and_scalar(B::bitwise_right_shift(bits, shifts), 1.into());
                let mask = B::float_mul_scalar(B::int_into_float(ones, dtype), value.into());
                B::float_reshape(mask, shape)
            }
        }
    }
}

/// The dropout product as one op per backend.
#[backend_extension(Cube, Flex, NdArray, Autodiff)]
pub trait DropoutKernels: Backend {
    /// `x · mask`: mask `{0, 1/keep}` of x's shape, `keep` the probability to keep an element.
    fn masked(x: FloatTensor<Self>, mask: FloatTensor<Self>, keep: f64) -> FloatTensor<Self>;
}

macro_rules! plain_backend {
    ($($b:ty),*) => {$(
        impl DropoutKernels for $b {
            fn masked(x: FloatTensor<Self>, mask: FloatTensor<Self>, _: f64) -> FloatTensor<Self> {
                Self::float_mul(x, mask)
            }
        }
    )*};
}

plain_backend!(Cube, Flex, NdArray);

#[derive(Debug)]
struct MaskedBackward;

impl<B: Backend> Backward<B, 1> for MaskedBackward {
    type State = KeptMask<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            // What Burn's `x · mask` registers, `g · mask`.
            grads.register::<B>(node.id, B::float_mul(g, ops.state.unpack()));
        }
    }
}

impl<B: Backend, C: CheckpointStrategy> DropoutKernels for Autodiff<B, C> {
    fn masked(x: FloatTensor<Self>, mask: FloatTensor<Self>, keep: f64) -> FloatTensor<Self> {
        let prep = MaskedBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let (x, mask) = (x.into_primitive(), mask.into_primitive());
        let out = B::float_mul(x, mask.clone());
        match prep {
            OpsKind::Tracked(prep) => prep.finish(KeptMask::pack(mask, 1.0 / keep), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// `x · mask` (mask `{0, 1/keep}`, x's shape) whose backward pass keeps the mask as bits
/// ([`KeptMask`]); the values and gradients of `x * mask`.
pub fn masked<const D: usize>(x: Tensor<D>, mask: Tensor<D>, keep: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as DropoutKernels>::masked(
        x.into_dispatch(),
        mask.into_dispatch(),
        keep,
    ))
}
