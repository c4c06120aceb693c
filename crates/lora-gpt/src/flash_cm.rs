//! f16 causal attention forward on workgroup-scope cooperative matrices
//! (`VK_NV_cooperative_matrix2`, see `lora_core::coopmat`).
//!
//! [`crate::flash`]'s forward kernel multiplies with f32 FMAs: 641 µs a layer of GPT-2 small at
//! 8 × 1024 in f16 on an H100, against 102 µs for cuDNN's. Here a cube of 256 units takes 128
//! queries of one head and walks the keys up to the diagonal 64 at a time; `q·kᵀ` and `p·v` are
//! one workgroup-scope matrix product each, q, k and v loaded from global memory by clamped
//! tensor loads. The online softmax runs on the units in between: the scores go through shared
//! memory (f32), two units take a row (every other column), the probabilities go back in place
//! and become an f16 A matrix, and `p·v` accumulates in an f32 accumulator. The row max the
//! probabilities use is raised only when a block passes it by more than [`LAZY`], and only then
//! are the output's rows rescaled (through shared memory). ~500 µs a layer in the training step
//! (with dropout), 417–448 µs for an inference forward where the f32-FMA kernel took 712–725.

use crate::flash::forward_outputs;
use crate::kernels::{DropArgs, SHIFT32};
use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cmma::{self, Cube as WorkGroup};
use cubecl::prelude::*;
use half::f16;
use lora_core::coopmat::offers;
use lora_core::kernels::{keep_factor, row_key};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Queries of a cube, keys of a step, the head size, units of a cube.
const BQ: usize = 128;
const BKV: usize = 64;
const HEAD: usize = 64;
const UNITS: u32 = 256;
/// Columns of a unit: every other one of its row of 64 keys (or of the output's 64).
const COLS: usize = 32;
/// Row stride of the f32 tile in shared memory (scores, probabilities, the output's rows):
/// padded so that the units' accesses spread over the banks.
const SS: usize = 68;
/// A masked score: finite, so that `exp(MASKED − max)` is 0 and never NaN.
const MASKED: f32 = -3.0e38;
/// How far a block's max may pass the max the probabilities use before it is raised (and the
/// output rescaled): probabilities up to `e⁸ ≈ 2981`, well inside f16.
const LAZY: f32 = 8.0;

/// Launches of [`flash_cm_kernel`] in this process ([`launches`]).
static LAUNCHES: AtomicUsize = AtomicUsize::new(0);

/// How many attention forwards ran on [`flash_cm_kernel`] in this process (tests, benchmarks).
pub fn launches() -> usize {
    LAUNCHES.load(Ordering::Relaxed)
}

/// Causal attention of one head's 128 queries in f16, as [`crate::flash`]'s forward kernel
/// computes it (the same output, log-sum-exp and hashed dropout).
///
/// q, k, v `[batch, head, seq, 64]` (as [`reads`] takes them: each head's rows one 64-column
/// block of the buffer seen as rows of the row stride); o `[batch, seq, head, 64]`
/// contiguous; lse `[batch, head, seq, 1]` (f32). Cube `(x, y)`: query block `blocks − 1 − x`
/// (the longest first) of head `y`. Unit u takes row `u / 2` of each tile at the columns
/// `u % 2 + 2·j`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, clippy::needless_borrow)]
fn flash_cm_kernel(
    q: &Tensor<f16>,
    k: &Tensor<f16>,
    v: &Tensor<f16>,
    seed: &Tensor<f32>,
    o: &mut Tensor<f16>,
    lse: &mut Tensor<f32>,
    scale: f32,
    threshold: u32,
    inv_keep: f32,
    blocks: u32,
    #[comptime] drop: bool,
) {
    let heads = q.shape(1);
    let t = q.shape(2);
    let bh = CUBE_POS_Y as usize;
    let (bi, hi) = (bh / heads, bh % heads);
    let qb = blocks - 1 - CUBE_POS_X;
    let q0 = qb * BQ as u32;
    let u = UNIT_POS_X as usize;
    let (r, c0) = (u / 2, u % 2);
    let row = q0 as usize + r;

    // Each operand's buffer as rows of its row stride; the head's first row and column there.
    let (qv, qr, qc) = head_view(q, bi, hi);
    let (kv, kr, kc) = head_view(k, bi, hi);
    let (vv, vr, vc) = head_view(v, bi, hi);

    let mut ss = Shared::<[f32]>::new_slice(comptime!(BQ * SS));
    let mut raised = Shared::<[u32]>::new_slice(1usize);

    let mut qa = unsafe {
        cmma::Matrix::<f16, WorkGroup>::uninitialized(
            cmma::MatrixIdent::A,
            BQ,
            BKV,
            HEAD,
            cmma::MatrixLayout::Undefined,
        )
    };
    let mut kb = unsafe {
        cmma::Matrix::<f16, WorkGroup>::uninitialized(
            cmma::MatrixIdent::B,
            BQ,
            BKV,
            HEAD,
            cmma::MatrixLayout::Undefined,
        )
    };
    let mut vb = unsafe {
        cmma::Matrix::<f16, WorkGroup>::uninitialized(
            cmma::MatrixIdent::B,
            BQ,
            HEAD,
            BKV,
            cmma::MatrixLayout::Undefined,
        )
    };
    let mut acc = cmma::Matrix::<f32, WorkGroup>::from_value(
        cmma::MatrixIdent::Accumulator,
        BQ,
        BKV,
        HEAD,
        cmma::MatrixLayout::Undefined,
        0.0,
    );
    let mut acc_o = cmma::Matrix::<f32, WorkGroup>::from_value(
        cmma::MatrixIdent::Accumulator,
        BQ,
        HEAD,
        BKV,
        cmma::MatrixLayout::Undefined,
        0.0,
    );
    cmma::load_tensor(
        &mut qa,
        &qv.slice(seq![qr + q0, qc], seq![BQ as u32, HEAD as u32]),
    );

    let mut key = 0u32;
    if comptime![drop] {
        key = row_key(seed, bh * t + row);
    }
    // The row's max as the probabilities use it (scaled scores; raised only when a block's max
    // passes it by more than `LAZY`, when the output's rows are rescaled) and its sum.
    let mut m = f32::new(MASKED);
    let mut l = f32::new(0.0);
    let mut x = Array::<f32>::new(COLS);
    for kbi in 0..(q0 + BQ as u32).div_ceil(BKV as u32) {
        let k0 = kbi * BKV as u32;
        if u == 0 {
            raised[0] = 0;
        }
        // Scores: q · kᵀ, k's rows as the columns of b.
        let kt = kv.slice(seq![kr + k0, kc], seq![BKV as u32, HEAD as u32]);
        cmma::load_tensor(&mut kb, &kt.permuted(seq![1, 0]));
        cmma::fill(&mut acc, 0.0);
        cmma::execute::<f16, f16, f32, f32, WorkGroup>(&qa, &kb, &acc, &acc);
        cmma::store(&mut ss, &acc, SS as u32, cmma::MatrixLayout::RowMajor);
        sync_cube();
        // The online softmax of the unit's half row (every other column).
        let mut mx = f32::new(MASKED);
        #[unroll]
        for j in 0..COLS {
            let col = k0 as usize + c0 + 2 * j;
            let s = ss[r * SS + c0 + 2 * j] * scale;
            let s = select(col <= row && col < t, s, f32::new(MASKED));
            x[j] = s;
            mx = f32::max(mx, s);
        }
        mx = f32::max(mx, plane_shuffle_xor(mx, 1));
        let mut alpha = f32::new(1.0);
        if mx > m + LAZY {
            alpha = f32::exp(m - mx);
            m = mx;
            if kbi > 0 {
                raised[0] = 1;
            }
        }
        let mut sum = f32::new(0.0);
        #[unroll]
        for j in 0..COLS {
            let mut p = f32::exp(x[j] - m);
            sum += p;
            if comptime![drop] {
                let col = k0 as usize + c0 + 2 * j;
                p *= keep_factor(key, col, threshold, inv_keep, SHIFT32);
            }
            ss[r * SS + c0 + 2 * j] = p;
        }
        sum += plane_shuffle_xor(sum, 1);
        l = l * alpha + sum;
        sync_cube();
        let vt = vv.slice(seq![vr + k0, vc], seq![BKV as u32, HEAD as u32]);
        cmma::load_tensor(&mut vb, &vt);
        // The probabilities as an f16 A matrix; a raised max rescales the output's rows through
        // shared memory (rare after the first block); then o += p · v in the accumulator.
        cmma::load_with_layout(&mut acc, &ss, SS as u32, cmma::MatrixLayout::RowMajor);
        let pa = to_a(&acc);
        if raised[0] == 1 {
            sync_cube();
            cmma::store(&mut ss, &acc_o, SS as u32, cmma::MatrixLayout::RowMajor);
            sync_cube();
            #[unroll]
            for j in 0..COLS {
                ss[r * SS + c0 + 2 * j] *= alpha;
            }
            sync_cube();
            cmma::load_with_layout(&mut acc_o, &ss, SS as u32, cmma::MatrixLayout::RowMajor);
        }
        cmma::execute::<f16, f16, f32, f32, WorkGroup>(&pa, &vb, &acc_o, &acc_o);
        sync_cube();
    }
    cmma::store(&mut ss, &acc_o, SS as u32, cmma::MatrixLayout::RowMajor);
    sync_cube();
    if row < t {
        let base = ((bi * t + row) * heads + hi) * HEAD + c0;
        let inv = 1.0 / l;
        #[unroll]
        for j in 0..COLS {
            o[base + 2 * j] = f16::cast_from(ss[r * SS + c0 + 2 * j] * inv);
        }
        if c0 == 0 {
            lse[bh * t + row] = m + f32::ln(l);
        }
    }
}

/// An f32 accumulator as an f16 A matrix (`cmma::cast_with_ident`, whose expand takes the
/// matrix by value where the frontend lends it).
#[allow(unused_variables)]
fn to_a(acc: &cmma::Matrix<f32, WorkGroup>) -> cmma::Matrix<f16, WorkGroup> {
    cubecl::unexpanded!()
}

mod to_a {
    use super::*;
    use cubecl::cmma::MatrixExpand;

    pub fn expand(
        scope: &Scope,
        acc: &MatrixExpand<f32, WorkGroup>,
    ) -> MatrixExpand<f16, WorkGroup> {
        cmma::cast_with_ident::expand::<f32, f16, WorkGroup>(
            scope,
            acc.clone(),
            cmma::MatrixIdent::A,
        )
    }
}

/// x `[batch, head, seq, d]`'s buffer as a tensor view of rows of its row stride (as many rows
/// as start in the buffer, so that loads past the last clamp to 0), and head `(bi, hi)`'s first
/// row and column in it.
#[cube]
#[allow(clippy::needless_borrow)]
fn head_view(x: &Tensor<f16>, bi: usize, hi: usize) -> (TensorView<f16>, u32, u32) {
    let rs = u32::cast_from(x.stride(2));
    let base = u32::cast_from(bi * x.stride(0) + hi * x.stride(1));
    let len = u32::cast_from(x.buffer_len());
    let xs = x.slice(0, x.buffer_len());
    let view = TensorView::new(&xs, seq![len.div_ceil(rs), rs])
        .with_strides(seq![rs, 1u32])
        .finish();
    (view, base / rs, base % rs)
}

/// Whether the device runs [`flash_cm_kernel`]: workgroup-scope matrices of 256 units for its
/// two products (`[BQ, BKV, HEAD]` and `[BQ, HEAD, BKV]`, [`lora_core::coopmat::offers`]) and the
/// shared memory (the f32 tile, the flag, the driver's reserve).
fn available(t: &CubeTensor) -> bool {
    let hardware = &t.client.properties().hardware;
    let shared = BQ * SS * 4 + 4 + hardware.cube_mma_reserved_shared_memory;
    shared <= hardware.max_shared_memory_size
        && offers(t, UNITS, [BQ, BKV, HEAD])
        && offers(t, UNITS, [BQ, HEAD, BKV])
}

/// Whether x `[batch, head, seq, 64]` reads as [`flash_cm_kernel`] reads it: unit column
/// stride, a row stride that is a multiple of 8 elements (16 bytes) and at least 64, each head's
/// rows one 64-column block of those rows, and an aligned start.
fn reads(x: &CubeTensor) -> bool {
    let [b, h, _, d] = x.meta.shape.dims::<4>();
    let s = x.meta.strides();
    let rs = s[2];
    d == HEAD
        && s[3] == 1
        && rs >= HEAD
        && rs.is_multiple_of(8)
        && x.handle.offset_start.is_none_or(|o| o.is_multiple_of(16))
        && (0..b).all(|bi| (0..h).all(|hi| (bi * s[0] + hi * s[1]) % rs + HEAD <= rs))
}

/// Causal attention of q, k, v `[batch, head, seq, 64]` in f16 with hashed dropout `drop`, as
/// [`crate::flash::flash_forward`] returns it (the output `[batch, seq, head, 64]` contiguous,
/// the log-sum-exp `[batch, head, seq, 1]` f32); `None` where the kernel does not apply: not
/// f16, no workgroup-scope matrices, operands it cannot read ([`reads`]), a grid too large.
pub(crate) fn flash_forward_cm(
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
    drop: Option<(CubeTensor, f64)>,
    scale: f64,
) -> Option<(CubeTensor, CubeTensor)> {
    let [b, h, t, _] = q.meta.shape.dims::<4>();
    let fits = [q, k, v]
        .iter()
        .all(|x| x.dtype == DType::F16 && x.meta.shape == q.meta.shape && reads(x));
    if !fits || t == 0 || b * h > 65_535 || !available(q) {
        return None;
    }
    let drop = DropArgs::new(drop, q);
    let client = q.client.clone();
    let (o, lse) = forward_outputs(q);
    let blocks = t.div_ceil(BQ);
    // Safety: loads are tensor-addressed and clamped to each buffer's rows; the units' shared
    // accesses stay in their row of a tile; stores check `row < t`.
    unsafe {
        flash_cm_kernel::launch_unchecked(
            &client,
            CubeCount::Static(blocks as u32, (b * h) as u32, 1),
            CubeDim::new_1d(UNITS),
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            drop.seed.into_tensor_arg(),
            o.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            scale as f32,
            drop.threshold,
            drop.inv_keep,
            blocks as u32,
            drop.drop,
        );
    }
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    Some((o, lse))
}
