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
//! `k` runs. Batched products stay Burn's: a tensor view built on a slice of the buffer (matrix
//! `z` of a batch) read from the buffer's start on the H100 (a batch-of-2 test got batch 0's rows
//! for batch 1), and a batched view would let a ragged tile's store run into the next matrix.

use burn::tensor::{DType, Shape};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cmma::{self, Cube as WorkGroup};
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

/// `out [m, n] = lhs [m, k] · rhs [k, n]`. An operand is row-major (`*_col` false: unit stride
/// along its last dim, rows `*_stride` apart) or column-major (unit stride along its first dim).
/// Cube `(x, y)` writes the `BM × BN` tile at rows `BM·y`, columns `BN·x`.
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
    #[comptime] lhs_col: bool,
    #[comptime] rhs_col: bool,
) {
    let m0 = CUBE_POS_Y * BM as u32;
    let n0 = CUBE_POS_X * BN as u32;
    let ls = lhs.slice(0, lhs.buffer_len());
    let rs = rhs.slice(0, rhs.buffer_len());
    let os = out.slice(0, out.len());
    // Views as stored: a column-major operand is its transpose, row-major.
    let l0 = if lhs_col { k } else { m };
    let l1 = if lhs_col { m } else { k };
    let r0 = if rhs_col { n } else { k };
    let r1 = if rhs_col { k } else { n };
    let lv = TensorView::new(&ls, seq![l0, l1])
        .with_strides(seq![lhs_stride, 1u32])
        .finish();
    let rv = TensorView::new(&rs, seq![r0, r1])
        .with_strides(seq![rhs_stride, 1u32])
        .finish();
    let ov = TensorView::new(&os, seq![m, n]).finish();
    let mut a = unsafe {
        cmma::Matrix::<f16, WorkGroup>::uninitialized(
            cmma::MatrixIdent::A,
            BM,
            BN,
            BK,
            cmma::MatrixLayout::Undefined,
        )
    };
    let mut b = unsafe {
        cmma::Matrix::<f16, WorkGroup>::uninitialized(
            cmma::MatrixIdent::B,
            BM,
            BN,
            BK,
            cmma::MatrixLayout::Undefined,
        )
    };
    let acc = cmma::Matrix::<f32, WorkGroup>::from_value(
        cmma::MatrixIdent::Accumulator,
        BM,
        BN,
        BK,
        cmma::MatrixLayout::Undefined,
        0.0,
    );
    for k0 in range_stepped(0u32, k, BK as u32) {
        if lhs_col {
            let v = lv.slice(seq![k0, m0], seq![BK as u32, BM as u32]);
            cmma::load_tensor(&mut a, &v.permuted(seq![1, 0]));
        } else {
            let v = lv.slice(seq![m0, k0], seq![BM as u32, BK as u32]);
            cmma::load_tensor(&mut a, &v);
        }
        if rhs_col {
            let v = rv.slice(seq![n0, k0], seq![BN as u32, BK as u32]);
            cmma::load_tensor(&mut b, &v.permuted(seq![1, 0]));
        } else {
            let v = rv.slice(seq![k0, n0], seq![BK as u32, BN as u32]);
            cmma::load_tensor(&mut b, &v);
        }
        cmma::execute::<f16, f16, f32, f32, WorkGroup>(&a, &b, &acc, &acc);
    }
    let o: cmma::Matrix<f16, WorkGroup> = cmma::cast::<f32, f16, WorkGroup>(&acc);
    let mut tile = ov.slice(seq![m0, n0], seq![BM as u32, BN as u32]);
    cmma::store_tensor(&mut tile, &o);
}

/// Whether the device runs [`coopmat_kernel`]: f16 × f16 → f32 workgroup-scope matrices of 256
/// units with tensor addressing.
pub fn available(t: &CubeTensor) -> bool {
    let features = &t.client.properties().features.matmul;
    let f16 = ElemType::Float(FloatKind::F16);
    features.cmma_tensor_addressing
        && features.cube_mma.iter().any(|c| {
            c.a_type == f16
                && c.b_type == f16
                && c.cd_type == ElemType::Float(FloatKind::F32)
                && c.units_per_block == Some(UNITS)
                && (BM as u32).is_multiple_of(c.m_granularity)
                && (BN as u32).is_multiple_of(c.n_granularity)
                && (BK as u32).is_multiple_of(c.k_granularity)
                && c.m_max as usize >= BM
                && c.n_max as usize >= BN
                && c.k_max as usize >= BK
        })
}

/// Whether `[.., m, k] · [.., k, n]` suits [`coopmat_kernel`] by its shapes: no batch dims
/// other than 1, m and n at least 64, k > n (see [`try_coopmat`]). f16 products that do not
/// suit it stay Burn's matmul op, which Burn's fusion can merge with its neighbours.
pub fn suits(lhs: &Shape, rhs: &Shape) -> bool {
    let r = lhs.num_dims();
    r >= 2
        && rhs.num_dims() == r
        && lhs[r - 1] == rhs[r - 2]
        && lhs[..r - 2].iter().chain(&rhs[..r - 2]).product::<usize>() == 1
        && lhs[r - 2].min(rhs[r - 1]) >= 64
        && lhs[r - 1] > rhs[r - 1]
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
/// apply: not f16, no workgroup-scope matrices ([`available`]), batch dims other than 1, an
/// operand with no unit-stride dim among its last two or unaligned strides, an output smaller
/// than 64 in m or n (thin products run elsewhere), or a reduction no longer than the output is
/// wide (`k ≤ n`). That last rule is from a training step's profile on an H100: the kernel won
/// where k > n (`[8192, 3072] · [3072, 768]` 421 → 320 µs, with w transposed 419 → 315,
/// `[8192, 2304] · [768, 2304]ᵀ` 307 → 247) and lost where k ≤ n (`[8192, 768] · [768, 3072]`
/// 334 → 368, with w transposed 315 → 360; the tied head's `[2048, 768] · [768, 50257]` 1.28 →
/// 1.49 ms).
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
    if !aligned(lhs) || !aligned(rhs) || gx > 65_535 || gy > 65_535 {
        return None;
    }
    let dims: Vec<usize> = ls[..r - 2].iter().copied().chain([m, n]).collect();
    let out = empty_device_contiguous_dtype(
        lhs.client.clone(),
        lhs.device.clone(),
        Shape::from(dims),
        DType::F16,
    );
    // Safety: every load and store is a tensor-addressed access clamped to the operand's view
    // (shape and strides as checked above).
    unsafe {
        coopmat_kernel::launch_unchecked(
            &lhs.client,
            CubeCount::Static(gx as u32, gy as u32, 1),
            CubeDim::new_1d(UNITS),
            lhs.clone().into_tensor_arg(),
            rhs.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            m as u32,
            k as u32,
            n as u32,
            lhs_stride as u32,
            rhs_stride as u32,
            lhs_col,
            rhs_col,
        );
    }
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    Some(out)
}
