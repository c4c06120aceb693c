//! f16 matrix products with workgroup-scope cooperative matrices (`VK_NV_cooperative_matrix2`).
//!
//! Burn's f16 matmuls on `vulkan` run cubecl's subgroup-scope (16 × 16) cooperative-matrix
//! kernels. Where the device offers workgroup-scope matrices with tensor addressing (NVIDIA's
//! Vulkan driver, Ampere and later), [`coopmat_kernel`] lets a cube of 256 units hold one
//! `128 × 128` f32 accumulator and load each `128 × 64` / `64 × 128` operand tile with one
//! clamped tensor load (`coopMatLoadTensorNV`); the driver stages and schedules the tiles. On an
//! H100 at GPT-2's shapes it runs 100–129 TFLOP/s, against 86–115 for Burn's autotuned choice
//! (`[8192, 3072] · [3072, 768]`: 0.300 ms against 0.448; `[8192, 2304] · [768, 2304]ᵀ`: 0.241
//! against 0.307 in a training step). Edges are clamped by the loads and stores, so any `m`, `n`,
//! `k` runs. A batch is one tall view of each operand, matrix `z` its `z`-th block of rows (a
//! tensor view over a slice of the buffer read from the buffer's start on the H100: a batch-of-2
//! test got batch 0's rows for batch 1), so a tile may read past its matrix into the next one:
//! harmless where the other operand's clamp zeroes those products, and ruled out where it would
//! not (rows of the output, [`try_coopmat`]).

use burn::tensor::{DType, Shape};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cmma::{self, Cube as WorkGroup, MatrixIdent, MatrixLayout};
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;
use half::f16;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Launches of [`coopmat_kernel`] in this process ([`launches`]).
static LAUNCHES: AtomicUsize = AtomicUsize::new(0);

/// How many products [`try_coopmat`] has launched in this process (for tests and benchmarks).
pub fn launches() -> usize {
    LAUNCHES.load(Ordering::Relaxed)
}

/// Output tile rows and columns of a cube, the reduction step, units of a cube.
const BM: usize = 128;
const BN: usize = 128;
const BK: usize = 64;
const UNITS: u32 = 256;

/// `out[z] [m, n] = lhs[z] [m, k] · rhs[z] [k, n]` for `z = CUBE_POS_Z < mats`. An operand is
/// row-major (`*_col` false: unit stride along its last dim, rows `*_stride` apart) or
/// column-major (unit stride along its first dim), its `*_mats` matrices (1: broadcast) stacked
/// as one view of `*_mats` blocks of rows. Cube `(x, y, z)` writes the `BM × BN` tile at rows
/// `BM·y`, columns `BN·x` of matrix z.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, clippy::needless_borrow)]
fn coopmat_kernel(
    lhs: &Tensor<f16>,
    rhs: &Tensor<f16>,
    out: &mut Tensor<f16>,
    m: u32,
    k: u32,
    n: u32,
    lhs_stride: u32,
    rhs_stride: u32,
    lhs_mats: u32,
    rhs_mats: u32,
    mats: u32,
    #[comptime] lhs_col: bool,
    #[comptime] rhs_col: bool,
) {
    let m0 = CUBE_POS_Y * BM as u32;
    let n0 = CUBE_POS_X * BN as u32;
    // Matrix z of a batch is the z-th block of rows of the operand's stored view (a broadcast
    // operand has one block).
    let z = CUBE_POS_Z;
    let zl = z * u32::min(lhs_mats - 1, 1);
    let zr = z * u32::min(rhs_mats - 1, 1);
    let ls = lhs.slice(0, lhs.buffer_len());
    let rs = rhs.slice(0, rhs.buffer_len());
    let os = out.slice(0, out.len());
    // Views as stored: a column-major operand is its transpose, row-major.
    let lrows = if lhs_col { k } else { m };
    let l1 = if lhs_col { m } else { k };
    let rrows = if rhs_col { n } else { k };
    let r1 = if rhs_col { k } else { n };
    let l0 = lrows * lhs_mats;
    let r0 = rrows * rhs_mats;
    let lv = TensorView::new(&ls, seq![l0, l1])
        .with_strides(seq![lhs_stride, 1u32])
        .finish();
    let rv = TensorView::new(&rs, seq![r0, r1])
        .with_strides(seq![rhs_stride, 1u32])
        .finish();
    let ov = TensorView::new(&os, seq![m * mats, n]).finish();
    let mut a = operand(MatrixIdent::A, BM, BN, BK, MatrixLayout::Undefined);
    let mut b = operand(MatrixIdent::B, BM, BN, BK, MatrixLayout::Undefined);
    let acc = accumulator(BM, BN, BK);
    for k0 in range_stepped(0u32, k, BK as u32) {
        if lhs_col {
            let v = lv.slice(seq![zl * lrows + k0, m0], seq![BK as u32, BM as u32]);
            cmma::load_tensor(&mut a, &v.permuted(seq![1, 0]));
        } else {
            let v = lv.slice(seq![zl * lrows + m0, k0], seq![BM as u32, BK as u32]);
            cmma::load_tensor(&mut a, &v);
        }
        if rhs_col {
            let v = rv.slice(seq![zr * rrows + n0, k0], seq![BN as u32, BK as u32]);
            cmma::load_tensor(&mut b, &v.permuted(seq![1, 0]));
        } else {
            let v = rv.slice(seq![zr * rrows + k0, n0], seq![BK as u32, BN as u32]);
            cmma::load_tensor(&mut b, &v);
        }
        cmma::execute::<f16, f16, f32, f32, WorkGroup>(&a, &b, &acc, &acc);
    }
    let o: cmma::Matrix<f16, WorkGroup> = cmma::cast::<f32, f16, WorkGroup>(&acc);
    let mut tile = ov.slice(seq![z * m + m0, n0], seq![BM as u32, BN as u32]);
    cmma::store_tensor(&mut tile, &o);
}

/// An uninitialised f16 operand (`ident` A or B) of a workgroup-scope product of `[m, n, k]`
/// tiles, loaded with `layout` (`Undefined` for tensor loads).
#[cube]
pub fn operand(
    #[comptime] ident: MatrixIdent,
    #[comptime] m: usize,
    #[comptime] n: usize,
    #[comptime] k: usize,
    #[comptime] layout: MatrixLayout,
) -> cmma::Matrix<f16, WorkGroup> {
    unsafe { cmma::Matrix::<f16, WorkGroup>::uninitialized(ident, m, n, k, layout) }
}

/// A zeroed f32 accumulator of a workgroup-scope product of `[m, n, k]` tiles.
#[cube]
pub fn accumulator(
    #[comptime] m: usize,
    #[comptime] n: usize,
    #[comptime] k: usize,
) -> cmma::Matrix<f32, WorkGroup> {
    cmma::Matrix::<f32, WorkGroup>::from_value(
        MatrixIdent::Accumulator,
        m,
        n,
        k,
        MatrixLayout::Undefined,
        0.0,
    )
}

/// Whether the device runs [`coopmat_kernel`]: f16 × f16 → f32 workgroup-scope matrices of 256
/// units with tensor addressing for its tiles ([`offers`]).
pub fn available(t: &CubeTensor) -> bool {
    offers(t, UNITS, [BM, BN, BK])
}

/// Whether `t`'s device offers f16 × f16 → f32 workgroup-scope cooperative matrices of `units`
/// units with tensor addressing for products of `[m, n, k]` tiles (each a multiple of the
/// driver's granularity, none above its maximum).
pub fn offers(t: &CubeTensor, units: u32, [m, n, k]: [usize; 3]) -> bool {
    let features = &t.client.properties().features.matmul;
    let f16 = ElemType::Float(FloatKind::F16);
    features.cmma_tensor_addressing
        && features.cube_mma.iter().any(|c| {
            c.a_type == f16
                && c.b_type == f16
                && c.cd_type == ElemType::Float(FloatKind::F32)
                && c.units_per_block == Some(units)
                && (m as u32).is_multiple_of(c.m_granularity)
                && (n as u32).is_multiple_of(c.n_granularity)
                && (k as u32).is_multiple_of(c.k_granularity)
                && c.m_max as usize >= m
                && c.n_max as usize >= n
                && c.k_max as usize >= k
        })
}

/// The number of matrices of `[.., m, k] · [.., k, n]` if its batch dims are equal or one side's
/// are all 1 (broadcast), else `None`.
fn batches(lhs: &Shape, rhs: &Shape) -> Option<usize> {
    let r = lhs.num_dims();
    let (lb, rb) = (&lhs[..r - 2], &rhs[..r - 2]);
    let (lp, rp) = (lb.iter().product::<usize>(), rb.iter().product::<usize>());
    (lb == rb || lp == 1 || rp == 1).then_some(lp.max(rp))
}

/// Whether `[.., m, k] · [.., k, n]` suits [`coopmat_kernel`] by its shapes: batch dims equal or
/// broadcast, m and n at least 64, k > n, and m a multiple of the tile's 128 rows where there is
/// more than one matrix (see [`try_coopmat`]). f16 products that do not suit it stay Burn's
/// matmul op, which Burn's fusion can merge with its neighbours.
pub fn suits(lhs: &Shape, rhs: &Shape) -> bool {
    let r = lhs.num_dims();
    if r < 2 || rhs.num_dims() != r {
        return false;
    }
    let (m, k, n) = (lhs[r - 2], lhs[r - 1], rhs[r - 1]);
    k == rhs[r - 2]
        && m.min(n) >= 64
        && k > n
        && batches(lhs, rhs).is_some_and(|b| b == 1 || m.is_multiple_of(BM))
}

/// The element distance between an operand's matrices as blocks of its stored view: `Some(0)`
/// for one matrix, `Some(rows · stride)` where its batch dims flatten to that one stride (`rows`
/// of `stride` elements a matrix as stored), else `None`.
fn batch_stride(t: &CubeTensor, rows: usize, stride: usize) -> Option<usize> {
    let (shape, strides) = (&t.meta.shape, t.meta.strides());
    let r = shape.num_dims();
    let dims: Vec<usize> = (0..r - 2).filter(|&d| shape[d] > 1).collect();
    let Some(&last) = dims.last() else {
        return Some(0);
    };
    let flat = dims
        .windows(2)
        .all(|w| strides[w[0]] == strides[w[1]] * shape[w[1]]);
    (flat && strides[last] == rows * stride).then_some(strides[last])
}

/// An operand's last two dims `[rows, cols]` as the kernel reads them: `(column-major, stride of
/// the strided one)`, or `None` where neither has unit stride or the strided one is not a
/// multiple of 8 elements (16 bytes).
fn layout(t: &CubeTensor) -> Option<(bool, usize)> {
    let (shape, strides) = (&t.meta.shape, t.meta.strides());
    let r = shape.num_dims();
    let (col, stride) = if strides[r - 1] == 1 {
        (false, strides[r - 2].max(shape[r - 1]))
    } else if strides[r - 2] == 1 {
        (true, strides[r - 1].max(shape[r - 2]))
    } else {
        return None;
    };
    stride.is_multiple_of(8).then_some((col, stride))
}

/// `lhs [.., m, k] · rhs [.., k, n]` in f16 with [`coopmat_kernel`], or `None` where it does not
/// apply: not f16, no workgroup-scope matrices ([`available`]), an operand with no unit-stride dim
/// among its last two or unaligned strides, batch dims that do not suit ([`suits`]) or do not
/// stack as blocks of rows, or both operands' tiles able to read past k into the next matrix
/// (lhs column-major, rhs row-major, both batched, k not a multiple of 64), an output smaller
/// than 64 in m or n (thin products run elsewhere), or a reduction no longer than the output is
/// wide (`k ≤ n`). That last rule is from a training step's profile on an H100: the kernel won
/// where k > n (`[8192, 3072] · [3072, 768]` 421 → 320 µs, with w transposed 419 → 315,
/// `[8192, 2304] · [768, 2304]ᵀ` 307 → 247) and lost where k ≤ n (`[8192, 768] · [768, 3072]`
/// 334 → 368, with w transposed 315 → 360; the tied head's `[2048, 768] · [768, 50257]` 1.28 →
/// 1.49 ms). With batches, the f16 LoRA c_attn step ran 74.9 / 75.0 ms against 80.3 / 76.9
/// without this kernel (A/B on one H100).
pub fn try_coopmat(lhs: &CubeTensor, rhs: &CubeTensor) -> Option<CubeTensor> {
    let (ls, rs) = (&lhs.meta.shape, &rhs.meta.shape);
    if lhs.dtype != DType::F16 || rhs.dtype != DType::F16 || !suits(ls, rs) || !available(lhs) {
        return None;
    }
    let r = ls.num_dims();
    let (m, k, n) = (ls[r - 2], ls[r - 1], rs[r - 1]);
    let aligned = |t: &CubeTensor| t.handle.offset_start.is_none_or(|o| o.is_multiple_of(16));
    let (lhs_col, lhs_stride) = layout(lhs)?;
    let (rhs_col, rhs_stride) = layout(rhs)?;
    let (gx, gy) = (n.div_ceil(BN), m.div_ceil(BM));
    let mats = batches(ls, rs)?;
    let lhs_batch = batch_stride(lhs, if lhs_col { k } else { m }, lhs_stride)?;
    let rhs_batch = batch_stride(rhs, if rhs_col { n } else { k }, rhs_stride)?;
    let both_spill = lhs_col && !rhs_col && lhs_batch > 0 && rhs_batch > 0;
    if !aligned(lhs)
        || !aligned(rhs)
        || (both_spill && !k.is_multiple_of(BK))
        || gx > 65_535
        || gy > 65_535
        || mats > 65_535
    {
        return None;
    }
    let (lhs_mats, rhs_mats) = (
        if lhs_batch > 0 { mats } else { 1 },
        if rhs_batch > 0 { mats } else { 1 },
    );
    let batch = if ls[..r - 2].iter().product::<usize>() == mats {
        &ls[..r - 2]
    } else {
        &rs[..r - 2]
    };
    let dims: Vec<usize> = batch.iter().copied().chain([m, n]).collect();
    let out = empty_device_contiguous_dtype(
        lhs.client.clone(),
        lhs.device.clone(),
        Shape::from(dims),
        DType::F16,
    );
    // Safety: every load and store is a tensor-addressed access clamped to its operand's view
    // (shape, strides and stacked matrices as checked above).
    unsafe {
        coopmat_kernel::launch_unchecked(
            &lhs.client,
            CubeCount::Static(gx as u32, gy as u32, mats as u32),
            CubeDim::new_1d(UNITS),
            lhs.clone().into_tensor_arg(),
            rhs.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            m as u32,
            k as u32,
            n as u32,
            lhs_stride as u32,
            rhs_stride as u32,
            lhs_mats as u32,
            rhs_mats as u32,
            mats as u32,
            lhs_col,
            rhs_col,
        );
    }
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    Some(out)
}
