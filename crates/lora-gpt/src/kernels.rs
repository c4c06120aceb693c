//! Custom CubeCL kernels (GPUs): row-wise softmax work in one kernel each.
//!
//! Composed from Burn ops, the head's loss and its gradient over `[rows, vocab]` logits were six
//! kernels that each read and wrote the whole chunk (cast to f32, row max, subtract, exp, row sum,
//! divide), ~2.8 ms per chunk of 2048 × 50257 on an H100. [`ce_rows_kernel`] reads each row twice
//! and writes the gradient once; [`softmax_lse_kernel`] and [`softmax_grad_kernel`] do the same for
//! the attention scores' softmax and its backward pass. One cube of [`UNITS`] units per row, f32
//! arithmetic, the row's reduction in shared memory.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, backend_extension};
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Units per row: one cube of 256 strides over the vocabulary.
const UNITS: usize = 256;
/// Cubes along x before a second grid dimension is used.
const MAX_X: usize = 65_535;

/// This cube's row on the 2-D grid of [`row_cubes`].
#[cube]
fn cube_row() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

/// Tree reduction of each unit's running `(max, Σ exp(x − max))`, `sm[unit]` and `ss[unit]`:
/// the row's pair ends in `sm[0]`, `ss[0]`.
#[cube]
fn reduce_max_sum(sm: &mut Shared<[f32]>, ss: &mut Shared<[f32]>, unit: usize) {
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if unit < half {
            let m1 = sm[unit];
            let m2 = sm[unit + half];
            let mx = f32::max(m1, m2);
            ss[unit] = ss[unit] * (m1 - mx).exp() + ss[unit + half] * (m2 - mx).exp();
            sm[unit] = mx;
        }
        sync_cube();
        half /= 2;
    }
}

/// Per row of `logits [rows, v]` with target `t` and weight `w`: `w·(log Σ exp(x) − x[t])` into
/// `nll [rows, 1]` (f32) and, when `grad`, `w·(softmax(x) − onehot(t))` into `d [rows, v]`
/// (the logits' dtype). Arithmetic in f32.
#[cube(launch_unchecked)]
fn ce_rows_kernel<F: Float, I: Int>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    weights: &Tensor<f32>,
    nll: &mut Tensor<f32>,
    d: &mut Tensor<F>,
    rows: usize,
    #[comptime] grad: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let v = logits.shape(1);
    let base = row * logits.stride(0);
    let unit = UNIT_POS_X as usize;

    // This unit's running max and Σ exp(x − max) over its columns.
    let mut m = f32::new(-3.0e38);
    let mut s = f32::new(0.0);
    let mut c = unit;
    while c < v {
        let x = f32::cast_from(logits[base + c]);
        if x > m {
            s = s * (m - x).exp() + 1.0;
            m = x;
        } else {
            s += (x - m).exp();
        }
        c += UNITS;
    }

    let mut sm = Shared::<[f32]>::new_slice(UNITS);
    let mut ss = Shared::<[f32]>::new_slice(UNITS);
    sm[unit] = m;
    ss[unit] = s;
    reduce_max_sum(&mut sm, &mut ss, unit);
    let gm = sm[0];
    let gs = ss[0];

    let t = u32::cast_from(targets[row * targets.stride(0)]) as usize;
    let w = weights[row * weights.stride(0)];
    if unit == 0 {
        let xt = f32::cast_from(logits[base + t]);
        let at = row * nll.stride(0);
        nll[at] = w * (gm + gs.ln() - xt);
    }
    if comptime![grad] {
        let scale = w / gs;
        let dbase = row * d.stride(0);
        let mut c = unit;
        while c < v {
            let x = f32::cast_from(logits[base + c]);
            let mut g = (x - gm).exp() * scale;
            if c == t {
                g -= w;
            }
            d[dbase + c] = F::cast_from(g);
            c += UNITS;
        }
    }
}

/// Per row of `x = scores·scale + bias` (scores `[rows, t]`; bias `[seq, t]` strided, row
/// `r % seq`): `p = softmax(x)` in the scores' dtype and `lse = max + ln Σ exp(x − max)` (f32).
#[cube(launch_unchecked)]
fn softmax_lse_kernel<F: Float, B: Float>(
    scores: &Tensor<F>,
    bias: &Tensor<B>,
    p: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    rows: usize,
    scale: f32,
    #[define(F, B)] _dtypes: [ElemType; 2],
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let t = scores.shape(1);
    let base = row * t;
    let bbase = (row % bias.shape(0)) * bias.stride(0);
    let bstep = bias.stride(1);
    let unit = UNIT_POS_X as usize;

    let mut m = f32::new(-3.0e38);
    let mut s = f32::new(0.0);
    let mut c = unit;
    while c < t {
        let x = f32::cast_from(scores[base + c]) * scale + f32::cast_from(bias[bbase + c * bstep]);
        if x > m {
            s = s * (m - x).exp() + 1.0;
            m = x;
        } else {
            s += (x - m).exp();
        }
        c += UNITS;
    }
    let mut sm = Shared::<[f32]>::new_slice(UNITS);
    let mut ss = Shared::<[f32]>::new_slice(UNITS);
    sm[unit] = m;
    ss[unit] = s;
    reduce_max_sum(&mut sm, &mut ss, unit);
    let gm = sm[0];
    let gs = ss[0];
    if unit == 0 {
        lse[row] = gm + gs.ln();
    }
    let inv = 1.0 / gs;
    let mut c = unit;
    while c < t {
        let x = f32::cast_from(scores[base + c]) * scale + f32::cast_from(bias[bbase + c * bstep]);
        p[base + c] = F::cast_from((x - gm).exp() * inv);
        c += UNITS;
    }
}

/// Per row of p and dp `[rows, t]`: `ds = p·(dp − Σ dp·p)·scale` in dp's dtype.
#[cube(launch_unchecked)]
fn softmax_grad_kernel<F: Float>(
    p: &Tensor<F>,
    dp: &Tensor<F>,
    ds: &mut Tensor<F>,
    rows: usize,
    scale: f32,
    #[define(F)] _dtype: ElemType,
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let t = p.shape(1);
    let base = row * t;
    let unit = UNIT_POS_X as usize;
    let mut acc = f32::new(0.0);
    let mut c = unit;
    while c < t {
        acc += f32::cast_from(dp[base + c]) * f32::cast_from(p[base + c]);
        c += UNITS;
    }
    let mut sh = Shared::<[f32]>::new_slice(UNITS);
    sh[unit] = acc;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if unit < half {
            let total = sh[unit] + sh[unit + half];
            sh[unit] = total;
        }
        sync_cube();
        half /= 2;
    }
    let total = sh[0];
    let mut c = unit;
    while c < t {
        let pv = f32::cast_from(p[base + c]);
        let g = pv * (f32::cast_from(dp[base + c]) - total) * scale;
        ds[base + c] = F::cast_from(g);
        c += UNITS;
    }
}

/// One cube per row, `rows` of them over a 2-D grid.
fn row_cubes(rows: usize) -> CubeCount {
    let x = rows.clamp(1, MAX_X);
    CubeCount::Static(x as u32, rows.div_ceil(x).max(1) as u32, 1)
}

/// `[rows, t]` of a tensor whose last dim is t (contiguous first, then a view).
fn as_rows(x: CubeTensor) -> (CubeTensor, usize, usize) {
    let shape = x.meta.shape.clone();
    let t = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / t.max(1);
    let x = CubeBackend::float_reshape(into_contiguous(x), Shape::new([rows, t]));
    (x, rows, t)
}

fn launch_ce_rows(
    logits: CubeTensor,
    targets: CubeTensor,
    weights: CubeTensor,
    grad: bool,
) -> (CubeTensor, Option<CubeTensor>) {
    let logits = into_contiguous(logits);
    let [rows, v] = [logits.meta.shape[0], logits.meta.shape[1]];
    let (client, device) = (logits.client.clone(), logits.device.clone());
    let nll = empty_device_dtype(
        client.clone(),
        device.clone(),
        Shape::new([rows, 1]),
        DType::F32,
    );
    let d = grad.then(|| {
        empty_device_dtype(
            client.clone(),
            device.clone(),
            Shape::new([rows, v]),
            logits.dtype,
        )
    });
    // Without a gradient the kernel never touches `d`: a one-element stand-in.
    let d_arg = d.clone().unwrap_or_else(|| {
        empty_device_dtype(client.clone(), device, Shape::new([1, 1]), logits.dtype)
    });
    let count = row_cubes(rows);
    let dtypes = [
        dtype_to_storage_type(logits.dtype),
        dtype_to_storage_type(targets.dtype),
    ];
    // Safety: every index is in bounds (`c < v`, `t < v` for valid targets, `row < rows`).
    unsafe {
        ce_rows_kernel::launch_unchecked(
            &client,
            count,
            CubeDim::new_1d(UNITS as u32),
            logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            weights.into_tensor_arg(),
            nll.clone().into_tensor_arg(),
            d_arg.into_tensor_arg(),
            rows,
            grad,
            dtypes,
        );
    }
    (nll, d)
}

fn launch_softmax_lse(
    scores: CubeTensor,
    bias: CubeTensor,
    scale: f64,
) -> (CubeTensor, CubeTensor) {
    let shape = scores.meta.shape.clone();
    let (scores, rows, t) = as_rows(scores);
    // bias `[1, .., 1, seq, t]`, broadcast over the leading dims: `[seq, t]`.
    let nb = bias.meta.num_dims();
    let seq = bias.meta.shape[nb - 2];
    let bias = CubeBackend::float_reshape(into_contiguous(bias), Shape::new([seq, t]));
    let (client, device) = (scores.client.clone(), scores.device.clone());
    let p = empty_device_dtype(client.clone(), device.clone(), shape.clone(), scores.dtype);
    let lse = empty_device_dtype(client.clone(), device, row_shape(&shape), DType::F32);
    let dtypes = [
        dtype_to_storage_type(scores.dtype),
        dtype_to_storage_type(bias.dtype),
    ];
    // Safety: rows `< rows`, columns `< t`, bias rows `% seq`.
    unsafe {
        softmax_lse_kernel::launch_unchecked(
            &client,
            row_cubes(rows),
            CubeDim::new_1d(UNITS as u32),
            scores.into_tensor_arg(),
            bias.into_tensor_arg(),
            p.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            rows,
            scale as f32,
            dtypes,
        );
    }
    (p, lse)
}

fn launch_softmax_grad(p: CubeTensor, dp: CubeTensor, scale: f64) -> CubeTensor {
    let shape = dp.meta.shape.clone();
    let (p, rows, _) = as_rows(p);
    let (dp, _, _) = as_rows(dp);
    let (client, device) = (dp.client.clone(), dp.device.clone());
    let ds = empty_device_dtype(client.clone(), device, shape, dp.dtype);
    let dtype = dtype_to_storage_type(dp.dtype);
    // Safety: rows `< rows`, columns `< t`.
    unsafe {
        softmax_grad_kernel::launch_unchecked(
            &client,
            row_cubes(rows),
            CubeDim::new_1d(UNITS as u32),
            p.into_tensor_arg(),
            dp.into_tensor_arg(),
            ds.clone().into_tensor_arg(),
            rows,
            scale as f32,
            dtype,
        );
    }
    ds
}

/// `shape` with its last dim 1: one value per row.
fn row_shape(shape: &Shape) -> Shape {
    let mut shape = shape.clone();
    let last = shape.num_dims() - 1;
    shape[last] = 1;
    shape
}

fn lse_spec(scores: &TensorSpec) -> TensorSpec {
    TensorSpec::new(row_shape(&scores.shape), DType::F32)
}

fn nll_spec(logits: &TensorSpec) -> TensorSpec {
    TensorSpec::new(Shape::new([logits.shape[0], 1]), DType::F32)
}

/// Row kernels on cubecl.
#[backend_extension(Cube, Fusion)]
pub trait RowKernels: Backend {
    /// `softmax(scores·scale + bias)` over the last dim and its log-sum-exp: scores
    /// `[.., seq, t]`, bias `[1, .., 1, seq, t]` -> p (scores' shape and dtype) and lse
    /// `[.., seq, 1]` (f32).
    #[fusion(meta = |scores, _bias, _scale| (scores.clone(), lse_spec(scores)))]
    fn softmax_lse(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Softmax's backward pass over the last dim, times `scale`: `p·(dp − Σ dp·p)·scale`, p and dp
    /// of one shape and dtype.
    #[fusion(dtype = dp, shape = dp)]
    fn softmax_grad(p: FloatTensor<Self>, dp: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;

    /// logits `[rows, v]`, targets `[rows, 1]` (each `< v`), weights `[rows, 1]` (f32) ->
    /// `w·nll [rows, 1]` (f32) and `w·(softmax − onehot) [rows, v]` (the logits' dtype).
    #[fusion(meta = |logits, _targets, _weights| (nll_spec(logits), logits.clone()))]
    fn ce_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// [`ce_rows`](Self::ce_rows)'s `w·nll [rows, 1]` alone.
    #[fusion(meta = |logits, _targets, _weights| nll_spec(logits))]
    fn ce_rows_loss(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

impl RowKernels for CubeBackend {
    fn softmax_lse(scores: CubeTensor, bias: CubeTensor, scale: f64) -> (CubeTensor, CubeTensor) {
        launch_softmax_lse(scores, bias, scale)
    }

    fn softmax_grad(p: CubeTensor, dp: CubeTensor, scale: f64) -> CubeTensor {
        launch_softmax_grad(p, dp, scale)
    }

    fn ce_rows(
        logits: CubeTensor,
        targets: CubeTensor,
        weights: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        let (nll, d) = launch_ce_rows(logits, targets, weights, true);
        (nll, d.expect("asked for the gradient"))
    }

    fn ce_rows_loss(logits: CubeTensor, targets: CubeTensor, weights: CubeTensor) -> CubeTensor {
        launch_ce_rows(logits, targets, weights, false).0
    }
}
