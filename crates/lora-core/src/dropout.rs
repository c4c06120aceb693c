//! Dropout with cheaper masks on host (CPU) backends, a dropout product that keeps its mask
//! packed for the backward pass, and on GPUs a dropout that keeps no mask at all ([`hashed`]).
//!
//! Burn's `Dropout::forward` draws one Bernoulli sample per element from the backend's ChaCha
//! generator (a sampler built per element) and scales in a second pass: on the CPU backends that
//! was ~23 ns per element, a fifth of a minGPT training step. Here one draw from the device RNG
//! seeds a xoshiro generator that fills the `{0, 1/keep}` mask (~1 ns per element; another stream
//! than Burn's, the same law, a function of `device.seed(..)`), applied in one multiply.
//! The multiply is [`masked`]: one autodiff node whose backward pass keeps the mask as bits
//! ([`KeptMask`]), where Burn's `x · mask` keeps it in floats (GPT-2 small at 8 × 1024: 37 masks
//! of 25 MB). On cubecl devices (GPUs) [`dropout_folded`] draws no mask: [`hashed`] computes it
//! from a hash of a seed and each element's position, in Burn's int ops that burn-fusion fuses
//! with the product, and again in the backward pass.

#![allow(deprecated)] // `NdArray`: deprecated upstream, still one of our backends.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Cube, Dispatch, Flex, NdArray, backend_extension};
use burn::nn::Dropout;
use burn::tensor::{DType, Device, Distribution, Shape, Tensor, TensorData};
use burn::tensor::{FloatDType, IntDType};
use rand::{RngCore, SeedableRng};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether `device` runs on cubecl (a GPU, or its CPU runtime): its own RNG and matmul kernels.
pub fn on_cubecl(device: &Device) -> bool {
    device.identity().is_some()
}

/// Whether `d` drops anything on `device`: training, `prob > 0`, an autodiff device (Burn's rule).
fn active(d: &Dropout, device: &Device) -> bool {
    d.training.is_enabled() && d.prob != 0.0 && device.is_autodiff()
}

/// The `{0, 1/keep}` mask [`dropout_folded`] multiplies a `shape`, `dtype` tensor on `device` by,
/// or `None` where `d` drops nothing. For ops that take the mask as an input (fused attention).
/// On cubecl devices Burn's `Bernoulli(keep)` draws; on the host backends [`host_mask`].
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
    if !on_cubecl(device) {
        return Some(crate::cast_to(host_mask(shape.into(), keep, device), dtype));
    }
    // The mask is {0, 1}: x·(m/keep) rounds exactly as Burn's (x·m)·(1/keep).
    let mask = Tensor::random(shape, Distribution::Bernoulli(keep), (device, dtype));
    Some(mask.mul_scalar(1.0 / keep))
}

/// The seed of a dropout drawn inside a kernel from a hash of the seed and each element's position
/// (ops that recompute their mask in the backward pass instead of keeping it): two uniforms in
/// `[0, 1)` `[2]` (f32) from the device's generator, or `None` where `d` drops nothing. Inside
/// [`with_seed_pool`] a row of the pool's draw (`[SEED_ROW]`, its first two read).
pub fn dropout_seed(d: &Dropout, device: &Device) -> Option<Tensor<1>> {
    active(d, device).then(|| {
        pooled_seed(device)
            .unwrap_or_else(|| Tensor::random([2], Distribution::Default, (device, DType::F32)))
    })
}

/// Rows a seed pool draws at a time.
const POOL_ROWS: usize = 64;
/// Floats a pool's row: 256 bytes, so that a row is a view of the draw (cubecl slices a tensor
/// without a copy where both ends fall on its binding alignment, 256 bytes at most in practice).
pub const SEED_ROW: usize = 64;

/// The seeds drawn ahead on one device: `rows` `[POOL_ROWS, SEED_ROW]` (none drawn yet: `None`),
/// `next` the first unused.
struct SeedPool {
    device: Device,
    rows: Option<Tensor<2>>,
    next: usize,
}

thread_local! {
    static POOL: std::cell::RefCell<Option<SeedPool>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the [`dropout_seed`]s it draws on `device` taken from draws of [`POOL_ROWS`]
/// seeds at a time: one random launch for a forward pass's ~50 dropouts instead of one each
/// (~12 µs a launch on an H100). A function of `device.seed(..)` and the draws before it, as
/// before; the seeds are others than outside a pool. CPU backends draw as before.
pub fn with_seed_pool<T>(device: &Device, f: impl FnOnce() -> T) -> T {
    /// Puts the pool that was active back, also when `f` panics.
    struct Restore(Option<SeedPool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            POOL.set(self.0.take());
        }
    }
    if !device.is_autodiff() || !on_cubecl(device) {
        return f();
    }
    let pool = SeedPool {
        device: device.clone(),
        rows: None,
        next: 0,
    };
    let _restore = Restore(POOL.replace(Some(pool)));
    f()
}

/// The next row of the active pool for `device` (a new draw when it is used up), if any.
fn pooled_seed(device: &Device) -> Option<Tensor<1>> {
    POOL.with_borrow_mut(|pool| {
        let pool = pool.as_mut().filter(|p| p.device == *device)?;
        let rows = match &pool.rows {
            Some(rows) if pool.next < POOL_ROWS => rows.clone(),
            _ => {
                let shape = [POOL_ROWS, SEED_ROW];
                let rows = Tensor::random(shape, Distribution::Default, (device, DType::F32));
                (pool.rows, pool.next) = (Some(rows.clone()), 0);
                rows
            }
        };
        pool.next += 1;
        Some(rows.narrow(0, pool.next - 1, 1).reshape([SEED_ROW]))
    })
}

/// A `{0, 1/keep}` f32 mask on a host backend: one draw from the device generator (48 bits: f32
/// uniforms carry 24 each) seeds a xoshiro generator whose 32-bit halves are kept when below
/// `keep · 2³²`. Burn's own mask draws an `i64` from its ChaCha generator per element through a
/// sampler built per element: ~23 ns an element, a fifth of a minGPT training step; this is ~1 ns.
/// A function of `device.seed(..)` and the draws before it, as Burn's.
fn host_mask<const D: usize>(shape: Shape, keep: f64, device: &Device) -> Tensor<D> {
    let u = Tensor::<1>::random([2], Distribution::Default, (device, DType::F32))
        .into_data()
        .iter::<f32>()
        .map(|v| (v as f64 * (1u64 << 24) as f64) as u64)
        .collect::<Vec<_>>();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(u[0] | (u[1] << 24));
    let threshold = (keep * 4_294_967_296.0) as u64; // keep when a 32-bit draw is below
    let scale = (1.0 / keep) as f32;
    let n = shape.num_elements();
    let even = n.next_multiple_of(2);
    let mut mask = Vec::<f32>::with_capacity(even);
    for pair in mask.spare_capacity_mut()[..even].chunks_exact_mut(2) {
        let r = rng.next_u64();
        let kept = |bits: u64| if bits < threshold { scale } else { 0.0 };
        pair[0].write(kept(r & 0xffff_ffff));
        pair[1].write(kept(r >> 32));
    }
    // SAFETY: the loop wrote all `even` elements.
    unsafe { mask.set_len(even) };
    mask.truncate(n);
    Tensor::from_data(TensorData::new(mask, shape), device)
}

/// Burn's `Dropout::forward` (same law, same values and gradient as `x · mask / keep`), the `1/keep`
/// scale folded into the mask. On cubecl devices the mask is [`hashed`] (no mask is drawn or kept);
/// on the host backends [`host_mask`], the product one [`masked`] op whose backward pass keeps the
/// mask as bits.
pub fn dropout_folded<const D: usize>(d: &Dropout, x: Tensor<D>) -> Tensor<D> {
    let keep = 1.0 - d.prob;
    if on_cubecl(&x.device()) && D >= 2 {
        return match dropout_seed(d, &x.device()) {
            Some(seed) => hashed(x, seed, keep),
            None => x,
        };
    }
    match dropout_mask(d, x.shape(), &x.device(), x.dtype()) {
        Some(mask) => masked(x, mask, keep),
        None => x,
    }
}

/// `d` applied to `x` (identity unless `d` is training on an autodiff device with `prob > 0`):
/// [`dropout_folded`] (LoRA's input dropout; the name loralib and PEFT use).
pub fn dropout<const D: usize>(d: &Dropout, x: Tensor<D>) -> Tensor<D> {
    dropout_folded(d, x)
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
/// time of its ops (the sort demo pre-trains on 23,232 scores).
const PACK_MIN: usize = 1 << 16;

/// A dropout mask as a backward pass keeps it: one bit per element, 16 to an `i32` (`[n / 16, 1]`,
/// 1/16 of an f32 mask: GPT-2 small's attention masks at 8 × 1024 are 300 MB for 12 layers, not
/// 4.8 GB), or the mask itself where its element count is not a multiple of 16 or below
/// `PACK_MIN` (65,536), or where [`set_packed_masks`] turned packing off.
#[derive(Clone, Debug)]
pub enum KeptMask<B: MaskBits> {
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

impl<B: MaskBits> KeptMask<B> {
    /// The mask `{0, value}` packed: bit i of word w is element `16·w + i` ≠ 0.
    pub fn pack(mask: FloatTensor<B>, value: f64) -> Self {
        let shape = mask.shape();
        let n = shape.num_elements();
        if !n.is_multiple_of(MASK_BITS) || n < PACK_MIN || !PACKED_MASKS.load(Ordering::Relaxed) {
            return KeptMask::Dense(mask);
        }
        let dtype = FloatDType::from(mask.dtype());
        KeptMask::Packed {
            bits: B::pack_bits(mask),
            shape,
            value,
            dtype,
        }
    }

    /// `x · mask` (x of the mask's shape), without rebuilding a packed mask on flex.
    pub fn mul(&self, x: FloatTensor<B>) -> FloatTensor<B> {
        match self {
            KeptMask::Dense(mask) => B::float_mul(x, mask.clone()),
            KeptMask::Packed { bits, value, .. } => B::mul_bits(x, bits.clone(), *value),
        }
    }

    /// The mask in the form [`KeptMask::mul`] applies fastest more than once: as it is where the
    /// backend multiplies by the bits directly ([`MaskBits::MUL_PACKED`]), else unpacked once.
    pub fn for_mul(self) -> Self {
        match B::MUL_PACKED {
            true => self,
            false => KeptMask::Dense(self.unpack()),
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
            } => burn_unpack::<B>(bits, shape, value, dtype),
        }
    }
}

/// A dropout mask to bits and back ([`KeptMask`]'s layout: `[n / 16, 1]` `i32` words, bit i of
/// word w element `16·w + i`); Burn's tensor ops, or host loops on flex that pack and multiply by the
/// bits (Burn's ops there were ~6 % of a GPT-2 training step; flex never needs the mask rebuilt).
pub trait MaskBits: Backend {
    /// Whether [`MaskBits::mul_bits`] multiplies by the bits without rebuilding the mask.
    const MUL_PACKED: bool = false;

    /// `mask [n]` (`n` a multiple of 16, any shape) -> `[n / 16, 1]` words of its ≠ 0 bits.
    fn pack_bits(mask: FloatTensor<Self>) -> IntTensor<Self> {
        burn_pack::<Self>(mask)
    }

    /// `x · mask`: the mask of [`MaskBits::pack_bits`]'s words `bits`, `{0, value}`, x's shape.
    fn mul_bits(x: FloatTensor<Self>, bits: IntTensor<Self>, value: f64) -> FloatTensor<Self> {
        burn_mul_bits::<Self>(x, bits, value)
    }
}

/// [`MaskBits::mul_bits`] in Burn's ops: x seen as `[n / 16, 16]` (one row a word) times the
/// unpacked words, then x's shape again. With no reshape between the unpacking and the product,
/// burn-fusion runs them as one element-wise kernel.
fn burn_mul_bits<B: Backend>(x: FloatTensor<B>, bits: IntTensor<B>, value: f64) -> FloatTensor<B> {
    let shape = x.shape();
    let dtype = x.dtype().into();
    let x = B::float_reshape(x, word_rows(&shape));
    B::float_reshape(B::float_mul(x, unpack_rows::<B>(bits, value, dtype)), shape)
}

/// `[n / 16, 16]`: a mask of `shape` one row a packed word.
fn word_rows(shape: &Shape) -> Shape {
    Shape::new([shape.num_elements() / MASK_BITS, MASK_BITS])
}

/// [`MaskBits::pack_bits`] in Burn's ops: per row of the mask seen as `[n / 16, 16]`, the f32 sum
/// of `sign(m)·2ⁱ` (exact: distinct powers of two below 2¹⁶), then the `[n / 16, 1]` sums as i32.
/// burn-fusion runs the sign, the cast and the weighting as one element-wise kernel (an i32 cast
/// there ran as two more full-size kernels), then the row sum and the small cast.
pub(crate) fn burn_pack<B: Backend>(mask: FloatTensor<B>) -> IntTensor<B> {
    // The weights first: an upload between the ops would cut their chain.
    let weights = (0..MASK_BITS)
        .map(|i| (1i32 << i) as f32)
        .collect::<Vec<_>>();
    let weights = B::float_from_data(TensorData::new(weights, [1, MASK_BITS]), &mask.device());
    let rows = word_rows(&mask.shape());
    let ones = B::float_cast(B::float_sign(B::float_reshape(mask, rows)), FloatDType::F32);
    let words = B::float_sum_dim(B::float_mul(ones, weights), 1);
    B::float_into_int(words, IntDType::I32)
}

/// [`MaskBits::pack_bits`]'s words -> the `shape`, `dtype` mask `{0, value}`, in Burn's int ops.
pub(crate) fn burn_unpack<B: Backend>(
    bits: IntTensor<B>,
    shape: Shape,
    value: f64,
    dtype: FloatDType,
) -> FloatTensor<B> {
    B::float_reshape(unpack_rows::<B>(bits, value, dtype), shape)
}

/// The words `[n / 16, 1]` -> the mask `{0, value}` as `[n / 16, 16]` (bit i of a word in column i).
fn unpack_rows<B: Backend>(bits: IntTensor<B>, value: f64, dtype: FloatDType) -> FloatTensor<B> {
    let device = bits.device();
    let shifts = (0..MASK_BITS as i32).collect::<Vec<_>>();
    let shifts = B::int_from_data(TensorData::new(shifts, [1, MASK_BITS]), &device);
    let ones = B::bitwise_and_scalar(B::bitwise_right_shift(bits, shifts), 1.into());
    B::float_mul_scalar(B::int_into_float(ones, dtype), value.into())
}

impl MaskBits for Cube {}
impl MaskBits for NdArray {}

/// Words per rayon task of flex's mask loops (1 Mi mask elements).
const WORDS_PER_TASK: usize = 1 << 16;

impl MaskBits for Flex {
    const MUL_PACKED: bool = true;

    fn pack_bits(mask: FloatTensor<Self>) -> IntTensor<Self> {
        if mask.dtype() != DType::F32 {
            return burn_pack::<Self>(mask);
        }
        let mask = crate::utils::flex_contiguous(mask);
        let m = mask.as_slice::<f32>().expect("contiguous f32");
        let mut words = vec![0i32; m.len() / MASK_BITS];
        words
            .par_chunks_mut(WORDS_PER_TASK)
            .zip(m.par_chunks(WORDS_PER_TASK * MASK_BITS))
            .for_each(|(words, m)| bits::pack(words, m));
        let n = words.len();
        Self::int_from_data(TensorData::new(words, [n, 1]), &Default::default())
    }

    fn mul_bits(x: FloatTensor<Self>, bits: IntTensor<Self>, value: f64) -> FloatTensor<Self> {
        let fits = x.shape().num_elements() == bits.shape().num_elements() * MASK_BITS;
        if x.dtype() != DType::F32 || bits.dtype() != DType::I32 || !bits.is_contiguous() || !fits {
            return burn_mul_bits::<Self>(x, bits, value);
        }
        let shape = x.shape();
        let x = crate::utils::flex_contiguous(x);
        let (words, x) = (
            bits.as_slice::<i32>().expect("i32"),
            x.as_slice::<f32>().expect("f32"),
        );
        let value = value as f32;
        let mut out = Vec::<f32>::with_capacity(x.len());
        out.spare_capacity_mut()
            .par_chunks_mut(WORDS_PER_TASK * MASK_BITS)
            .zip(x.par_chunks(WORDS_PER_TASK * MASK_BITS))
            .zip(words.par_chunks(WORDS_PER_TASK))
            .for_each(|((out, x), words)| bits::mul(out, x, words, value));
        // SAFETY: every element was written above (`x.len()` is 16 · `words.len()`).
        unsafe { out.set_len(x.len()) };
        Self::float_from_data(TensorData::new(out, shape), &Default::default())
    }
}

/// The dropout products as one op per backend.
#[backend_extension(Cube, Flex, NdArray, Autodiff)]
pub trait DropoutKernels: Backend {
    /// `x · mask`: mask `{0, 1/keep}` of x's shape, `keep` the probability to keep an element.
    fn masked(x: FloatTensor<Self>, mask: FloatTensor<Self>, keep: f64) -> FloatTensor<Self>;

    /// `x · mask` with the mask of [`hashed`]: `seed` `[2]` (f32 uniforms), x of rank ≥ 2.
    fn hashed(x: FloatTensor<Self>, seed: FloatTensor<Self>, keep: f64) -> FloatTensor<Self>;
}

macro_rules! plain_backend {
    ($($b:ty),*) => {$(
        impl DropoutKernels for $b {
            fn masked(x: FloatTensor<Self>, mask: FloatTensor<Self>, _: f64) -> FloatTensor<Self> {
                Self::float_mul(x, mask)
            }

            fn hashed(x: FloatTensor<Self>, seed: FloatTensor<Self>, keep: f64) -> FloatTensor<Self> {
                HashKeys::<Self>::new(seed, &x.shape(), keep).mul(x)
            }
        }
    )*};
}

plain_backend!(Cube, Flex, NdArray);

#[derive(Debug)]
struct MaskedBackward;

impl<B: MaskBits> Backward<B, 1> for MaskedBackward {
    type State = KeptMask<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            // What Burn's `x · mask` registers, `g · mask`.
            grads.register::<B>(node.id, ops.state.mul(g));
        }
    }
}

#[derive(Debug)]
struct HashedBackward;

impl<B: Backend> Backward<B, 1> for HashedBackward {
    type State = HashKeys<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            grads.register::<B>(node.id, ops.state.mul(g));
        }
    }
}

impl<B: MaskBits, C: CheckpointStrategy> DropoutKernels for Autodiff<B, C> {
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

    fn hashed(x: FloatTensor<Self>, seed: FloatTensor<Self>, keep: f64) -> FloatTensor<Self> {
        let prep = HashedBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let x = x.into_primitive();
        let keys = HashKeys::<B>::new(seed.into_primitive(), &x.shape(), keep);
        let out = keys.mul(x);
        match prep {
            OpsKind::Tracked(prep) => prep.finish(keys, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// Hashed dropout's mask, as Burn's int ops compute it (element-wise, so burn-fusion runs the
/// hash, the product and their neighbours as one kernel): element `(row, col)` of x seen as
/// `[rows, cols]` is kept when the top 24 bits of `mix32(col ^ key(row))` are below `keep·2²⁴`,
/// `key(row) = mix32(mix32(row ^ s0) + s1)` ([`mix32`]: Wellons' lowbias32; `s0, s1` the seed's two
/// uniforms times 2²⁴). The backward pass keeps only the row keys and column indices and computes
/// the mask again.
#[derive(Clone, Debug)]
struct HashKeys<B: Backend> {
    /// `key(row)`, x's shape with a last dimension of 1 (i32).
    keys: IntTensor<B>,
    /// `0..cols`, `[1, …, 1, cols]` (i32).
    cols: IntTensor<B>,
    /// The probability to keep an element.
    keep: f64,
}

impl<B: Backend> HashKeys<B> {
    /// The keys of an x of `shape` (rank ≥ 2) for `seed` `[2]` (f32 uniforms in `[0, 1)`).
    fn new(seed: FloatTensor<B>, shape: &Shape, keep: f64) -> Self {
        let device = seed.device();
        let d = shape.num_dims();
        let cols = shape[d - 1];
        let rows = shape.num_elements() / cols.max(1);
        let (mut row_shape, mut col_shape) = (shape.clone(), Shape::from(vec![1; d]));
        row_shape[d - 1] = 1;
        col_shape[d - 1] = cols;
        let iota = |n: usize, shape: Shape| {
            let v = (0..n as i32).collect::<Vec<_>>();
            B::int_from_data(TensorData::new(v, shape), &device)
        };
        let (row, cols) = (iota(rows, row_shape), iota(cols, col_shape));
        let seed = B::float_mul_scalar(B::float_cast(seed, FloatDType::F32), 16_777_216f64.into());
        let seed = B::float_into_int(seed, IntDType::I32);
        let s = |i: usize| {
            let si = B::int_slice(
                seed.clone(),
                &[burn::tensor::Slice::new(
                    i as isize,
                    Some(i as isize + 1),
                    1,
                )],
            );
            B::int_reshape(si, Shape::from(vec![1; d]))
        };
        let key = mix32_ops::<B>(B::bitwise_xor(row, s(0)));
        let keys = mix32_ops::<B>(B::int_add(key, s(1)));
        Self { keys, cols, keep }
    }

    /// `x · mask`, x of the shape the keys were made for: `x · ({0, 1} as x's dtype · 1/keep)`.
    fn mul(&self, x: FloatTensor<B>) -> FloatTensor<B> {
        let dtype = FloatDType::from(x.dtype());
        let h = mix32_ops::<B>(B::bitwise_xor(self.cols.clone(), self.keys.clone()));
        let top =
            B::bitwise_and_scalar(B::bitwise_right_shift_scalar(h, 8.into()), 0xff_ffff.into());
        // (top − threshold) < 0 exactly when kept: its sign bit (no overflow below 2²⁵).
        let below = B::int_sub_scalar(top, (keep_threshold24(self.keep) as i64).into());
        let kept = B::bitwise_and_scalar(B::bitwise_right_shift_scalar(below, 31.into()), 1.into());
        let mask = B::float_mul_scalar(B::int_into_float(kept, dtype), (1.0 / self.keep).into());
        B::float_mul(x, mask)
    }
}

/// `x · mask` with [`hashed`]'s mask for `seed` `[2]` and `keep`, in a backend's ops.
pub(crate) fn hashed_mul<B: Backend>(
    x: FloatTensor<B>,
    seed: FloatTensor<B>,
    keep: f64,
) -> FloatTensor<B> {
    HashKeys::<B>::new(seed, &x.shape(), keep).mul(x)
}

/// `keep·2²⁴`: hashed dropout keeps an element when the top 24 bits of its hash are below this.
pub(crate) fn keep_threshold24(keep: f64) -> u32 {
    (keep * 16_777_216.0).round().clamp(0.0, 16_777_216.0) as u32
}

/// Wellons' lowbias32 in i32 ops (wrapping products; right shifts masked to be logical).
fn mix32_ops<B: Backend>(x: IntTensor<B>) -> IntTensor<B> {
    let shift_xor = |x: IntTensor<B>, s: u32| {
        let high = B::bitwise_and_scalar(
            B::bitwise_right_shift_scalar(x.clone(), (s as i64).into()),
            (((1u64 << (32 - s)) - 1) as i64).into(),
        );
        B::bitwise_xor(x, high)
    };
    let x = B::int_mul_scalar(shift_xor(x, 16), (0x7feb_352d_i64).into());
    let x = B::int_mul_scalar(shift_xor(x, 15), (0x846c_a68b_u32 as i32 as i64).into());
    shift_xor(x, 16)
}

/// Wellons' lowbias32 on the host ([`HashKeys`]' hash; the GPU attention kernels' too).
pub fn mix32(x: u32) -> u32 {
    let mut x = x;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// Whether [`hashed`] keeps element `(row, col)` (x seen as `[rows, cols]`) for the seeds
/// `s0, s1` (the seed's uniforms times 2²⁴) and `keep` ([`HashKeys`]), on the host.
pub fn hashed_kept(row: usize, col: usize, [s0, s1]: [u32; 2], keep: f64) -> bool {
    let key = mix32(mix32(row as u32 ^ s0).wrapping_add(s1));
    (mix32(col as u32 ^ key) >> 8) < keep_threshold24(keep)
}

/// `x · mask` for a `{0, 1/keep}` mask hashed from `seed` (`[2]` f32 uniforms in `[0, 1)`, e.g.
/// [`dropout_seed`]) and each element's position ([`HashKeys`]); x of rank ≥ 2. The law of
/// Bernoulli dropout, the values and gradient of `x * mask`; the backward pass computes the mask
/// again from `[rows]` keys instead of keeping it.
pub fn hashed<const D: usize>(x: Tensor<D>, seed: Tensor<1>, keep: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as DropoutKernels>::hashed(
        x.into_dispatch(),
        seed.into_dispatch(),
        keep,
    ))
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

/// Flex's mask loops over blocks of 16 elements a word: AVX-512 where the CPU has it (a word is
/// one mask register), else scalar; the same values either way.
mod bits {
    use super::MASK_BITS;
    use std::mem::MaybeUninit;

    #[cfg(target_arch = "x86_64")]
    fn avx512() -> bool {
        std::is_x86_feature_detected!("avx512f")
    }

    /// `words[w]` ← bit i set where `m[16·w + i] ≠ 0`.
    pub(super) fn pack(words: &mut [i32], m: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { v4::pack(words, m) };
        }
        pack_scalar(words, m)
    }

    fn pack_scalar(words: &mut [i32], m: &[f32]) {
        for (w, m) in words.iter_mut().zip(m.chunks_exact(MASK_BITS)) {
            *w = m
                .iter()
                .enumerate()
                .fold(0, |w, (i, &v)| w | (((v != 0.0) as i32) << i));
        }
    }

    /// `out` ← `x · mask` as `x * mask` rounds it: `x · value`, or `x · 0` (±0; NaN for ±inf).
    pub(super) fn mul(out: &mut [MaybeUninit<f32>], x: &[f32], words: &[i32], value: f32) {
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { v4::mul(out, x, words, value) };
        }
        mul_scalar(out, x, words, value)
    }

    fn mul_scalar(out: &mut [MaybeUninit<f32>], x: &[f32], words: &[i32], value: f32) {
        let blocks = out
            .chunks_exact_mut(MASK_BITS)
            .zip(x.chunks_exact(MASK_BITS));
        for ((out, x), &w) in blocks.zip(words) {
            for (i, (o, &x)) in out.iter_mut().zip(x).enumerate() {
                o.write(x * if (w >> i) & 1 != 0 { value } else { 0.0 });
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod v4 {
        use super::MASK_BITS;
        use std::arch::x86_64::*;
        use std::mem::MaybeUninit;

        #[target_feature(enable = "avx512f")]
        pub(super) fn pack(words: &mut [i32], m: &[f32]) {
            let zero = _mm512_setzero_ps();
            for (w, m) in words.iter_mut().zip(m.chunks_exact(MASK_BITS)) {
                // SAFETY: `m` holds 16 f32.
                let v = unsafe { _mm512_loadu_ps(m.as_ptr()) };
                // Unordered ≠: NaN counts as kept, as `v != 0.0` does.
                *w = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(v, zero) as i32;
            }
        }

        #[target_feature(enable = "avx512f")]
        pub(super) fn mul(out: &mut [MaybeUninit<f32>], x: &[f32], words: &[i32], value: f32) {
            let (value, zero) = (_mm512_set1_ps(value), _mm512_setzero_ps());
            let blocks = out
                .chunks_exact_mut(MASK_BITS)
                .zip(x.chunks_exact(MASK_BITS));
            for ((out, x), &w) in blocks.zip(words) {
                // SAFETY: `x` and `out` hold 16 f32.
                unsafe {
                    let x = _mm512_loadu_ps(x.as_ptr());
                    let (kept, dropped) = (_mm512_mul_ps(x, value), _mm512_mul_ps(x, zero));
                    let v = _mm512_mask_blend_ps(w as u16, dropped, kept);
                    _mm512_storeu_ps(out.as_mut_ptr() as *mut f32, v);
                }
            }
        }
    }

    /// The AVX-512 loops against the scalar ones, bit for bit, on ±0, ±inf, NaN and random values.
    #[cfg(all(test, target_arch = "x86_64"))]
    #[test]
    fn avx512_is_the_scalar_form() {
        use rand::{Rng, SeedableRng};
        if !avx512() {
            return;
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let special = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.5,
            -2.0,
        ];
        let x: Vec<f32> = (0..4096)
            .map(|i| match i % 3 {
                0 => special[rng.random_range(0..special.len())],
                1 => 0.0,
                _ => rng.random_range(-3.0..3.0),
            })
            .collect();
        let n = x.len() / MASK_BITS;
        let (mut a, mut b) = (vec![0; n], vec![0; n]);
        pack_scalar(&mut a, &x);
        // SAFETY (here and below): the CPU has AVX-512F.
        unsafe { v4::pack(&mut b, &x) };
        assert_eq!(a, b);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut oa = vec![MaybeUninit::new(7.0f32); x.len()];
        let mut ob = oa.clone();
        mul_scalar(&mut oa, &x, &a, 1.25);
        unsafe { v4::mul(&mut ob, &x, &a, 1.25) };
        // SAFETY: initialised above.
        let read = |o: &[MaybeUninit<f32>]| {
            o.iter()
                .map(|v| unsafe { v.assume_init() })
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&read(&oa)), bits(&read(&ob)));
    }
}
