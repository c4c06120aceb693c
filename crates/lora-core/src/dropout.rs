//! Dropout with cheaper masks on host (CPU) backends.
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
//! Devices with their own RNG kernels (GPUs) use Burn's.

use burn::nn::Dropout;
use burn::tensor::{DType, Device, Distribution, Int, Shape, Tensor, TensorData};
use rand::{RngCore, SeedableRng};

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
        Some(mask) => x * mask,
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
        return d.forward(x);
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
    x * crate::cast_to(mask, dtype)
}
