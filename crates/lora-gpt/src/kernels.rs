//! Custom CubeCL kernels (GPUs): row-wise softmax and LayerNorm work in one kernel each.
//!
//! Composed from Burn ops, the head's loss and its gradient over `[rows, vocab]` logits were six
//! kernels that each read and wrote the whole chunk (cast to f32, row max, subtract, exp, row sum,
//! divide), ~2.8 ms per chunk of 2048 × 50257 on an H100. [`ce_rows_kernel`] reads each row twice
//! and writes the gradient once; [`softmax_lse_kernel`] and [`softmax_grad_kernel`] do the same for
//! the attention scores' softmax and its backward pass. One cube of [`UNITS`] units per row (the
//! attention kernels: fewer for rows under 1024, [`softmax_units`]), f32 arithmetic, the row's
//! reduction in shared memory. The attention kernels take a block of query rows of the scores
//! (`fused::query_blocks`) and the whole causal bias.
//!
//! The attention kernels also apply dropout drawn in the kernel ("hashed dropout",
//! [`lora_core::kernels::keep_factors`] with all 32 bits of the hash): the
//! mask is a hash of a seed and the element's position, so the backward pass draws it again instead
//! of keeping it, and no mask is ever generated, stored, packed or multiplied in separate kernels.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, backend_extension};
use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, empty_device_dtype};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
// Hashed dropout's hash and row key, as lora-core's adapter kernels draw them; one cube a row.
use lora_core::kernels::{
    cube_row, keep_factors, row_cubes, row_key, vector_width, vector_width_at,
};

/// The attention kernels' hash rule keeps all 32 bits of the hash (`keep_factors`' shift 0,
/// `threshold = keep·2³²`).
pub(crate) const SHIFT32: u32 = 0;

/// Units per row: one cube of 256 strides over the vocabulary.
const UNITS: usize = 256;
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

/// Tree reduction of each unit's `sh[unit]`: the row's sum ends in `sh[0]`.
#[cube]
fn reduce_sum(sh: &mut Shared<[f32]>, unit: usize) {
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
}

/// Tree reduction of two sums at once, `sa[unit]` and `sb[unit]`: the row's end in `sa[0]`, `sb[0]`.
#[cube]
fn reduce_sum2(sa: &mut Shared<[f32]>, sb: &mut Shared<[f32]>, unit: usize) {
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if unit < half {
            let a = sa[unit] + sa[unit + half];
            let b = sb[unit] + sb[unit + half];
            sa[unit] = a;
            sb[unit] = b;
        }
        sync_cube();
        half /= 2;
    }
}

/// Whether hashed dropout keeps element `col` of row `row` (of all rows of the tensor, in order):
/// [`row_key`] and [`keep_factors`] (all 32 bits of the hash: shift 0) on the host, for the seeds
/// `s0, s1` and `threshold`.
pub(crate) fn kept_host(row: usize, col: usize, [s0, s1]: [u32; 2], threshold: u32) -> bool {
    use lora_core::dropout::mix32;
    let key = mix32(mix32(row as u32 ^ s0).wrapping_add(s1));
    mix32(col as u32 ^ key) < threshold
}

/// `keep·2³²`, the hash threshold of a keep probability (`keep < 1`).
pub(crate) fn keep_threshold(keep: f64) -> u32 {
    (keep * 4_294_967_296.0).min(u32::MAX as f64) as u32
}

/// Per row of `logits [rows, v]` with target `t` and weight `w`: `w·(log Σ exp(x) − x[t])` into
/// `nll [rows, 1]` (f32) and, when `grad`, `w·(softmax(x) − onehot(t))` into `d [s, rows, kp]`
/// (the logits' dtype): column `c` of the row at `d[c / kp, row, c % kp]`, zeros from column v to
/// `s·kp` (`s = 1, kp = v`: `[rows, v]`). Arithmetic in f32.
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
        let kp = d.shape(2);
        let (slice_stride, col_stride) = (d.stride(0), d.stride(2));
        let dbase = row * d.stride(1);
        let width = d.shape(0) * kp;
        let mut c = unit;
        while c < width {
            let mut g = f32::new(0.0);
            if c < v {
                let x = f32::cast_from(logits[base + c]);
                g = (x - gm).exp() * scale;
                if c == t {
                    g -= w;
                }
            }
            d[(c / kp) * slice_stride + dbase + (c % kp) * col_stride] = F::cast_from(g);
            c += UNITS;
        }
    }
}

/// Row `row` of a block of scores (`tc` rows a head, `query` its query) among all `[seq, seq]`
/// score rows: hashed dropout's row key, so the mask does not depend on the blocks.
#[cube]
fn score_row(row: usize, tc: usize, query: usize, seq: usize) -> usize {
    (row / tc) * seq + query
}

/// `x = score·scale + bias` for the `N` columns of vector `c` of a row (scores from vector `base`,
/// bias from vector `bbase`), each lane's score unused where its bias is a mask (≤ −10³⁰, as the
/// −∞ above the causal diagonal: its probability is 0; `x` = the bias).
#[cube]
fn logits<F: Float, B: Float, N: Size>(
    scores: &Tensor<Vector<F, N>>,
    bias: &Tensor<Vector<B, N>>,
    base: usize,
    bbase: usize,
    c: usize,
    scale: f32,
) -> Vector<f32, N> {
    let b = Vector::<f32, N>::cast_from(bias[bbase + c]);
    let x = Vector::<f32, N>::cast_from(scores[base + c]) * Vector::new(scale) + b;
    let mut out = b;
    #[unroll]
    for e in 0..N::value() {
        let be = b.extract(e);
        out.insert(e, select(be > f32::new(-1.0e30), x.extract(e), be));
    }
    out
}

/// Per row of `x = scores·scale + bias` (scores `[rows, t]`: blocks of `tc` rows, queries
/// `start..start + tc` of bias `[seq, ≥ t]`; row r is query `start + r % tc`):
/// `p = softmax(x)` in the scores' dtype, times the hashed dropout factor ([`keep_factors`], shift 0) when
/// `drop`, and `lse = max + ln Σ exp(x − max)` (f32). Rows are read and written `N` columns at a
/// time (t and the row strides multiples of `N`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn softmax_lse_kernel<F: Float, B: Float, N: Size>(
    scores: &Tensor<Vector<F, N>>,
    bias: &Tensor<Vector<B, N>>,
    seed: &Tensor<f32>,
    p: &mut Tensor<Vector<F, N>>,
    lse: &mut Tensor<f32>,
    rows: usize,
    tc: usize,
    start: usize,
    scale: f32,
    threshold: u32,
    inv_keep: f32,
    #[comptime] drop: bool,
    #[define(F, B)] _dtypes: [ElemType; 2],
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let tv = scores.shape(1) / N::value();
    let base = row * scores.stride(0) / N::value();
    // p is contiguous: row r at r·t.
    let pbase = row * tv;
    let query = start + row % tc;
    let bbase = query * bias.stride(0) / N::value();
    let unit = UNIT_POS_X as usize;
    let key_row = score_row(row, tc, query, bias.shape(0));

    let mut m = f32::new(-3.0e38);
    let mut s = f32::new(0.0);
    let mut c = unit;
    while c < tv {
        let xv = logits(scores, bias, base, bbase, c, scale);
        #[unroll]
        for e in 0..N::value() {
            let x = xv.extract(e);
            if x > m {
                s = s * (m - x).exp() + 1.0;
                m = x;
            } else {
                s += (x - m).exp();
            }
        }
        c += CUBE_DIM_X as usize;
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
    let key = row_key(seed, key_row);
    let mut c = unit;
    while c < tv {
        let xv = logits(scores, bias, base, bbase, c, scale);
        let mut v = (xv - Vector::new(gm)).exp() * Vector::new(inv);
        if comptime![drop] {
            v *= keep_factors::<N>(key, c * N::value(), threshold, inv_keep, SHIFT32);
        }
        p[pbase + c] = Vector::cast_from(v);
        c += CUBE_DIM_X as usize;
    }
}

/// Softmax's backward pass through hashed dropout, per row of `x = scores·scale + bias` (as
/// [`softmax_lse_kernel`]) with its log-sum-exp `lse` of all `[seq, seq]` score rows (the whole
/// `[.., seq, 1]`, read at the block's rows): with the probabilities again,
/// `p = exp(x − lse)`, and m the dropout factor ([`keep_factors`], shift 0) when `drop` (else 1), the
/// dropped probabilities `pd = p·m` and `ds = p·(g − Σ p·g)·scale` for `g = dp·m`, both in the
/// scores' dtype (0 where the bias is a mask, whatever dp holds there). `N` columns at a time.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn softmax_grad_lse_kernel<F: Float, B: Float, N: Size>(
    scores: &Tensor<Vector<F, N>>,
    bias: &Tensor<Vector<B, N>>,
    lse: &Tensor<f32>,
    dp: &Tensor<Vector<F, N>>,
    seed: &Tensor<f32>,
    pd: &mut Tensor<Vector<F, N>>,
    ds: &mut Tensor<Vector<F, N>>,
    rows: usize,
    tc: usize,
    start: usize,
    scale: f32,
    threshold: u32,
    inv_keep: f32,
    #[comptime] drop: bool,
    #[define(F, B)] _dtypes: [ElemType; 2],
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let tv = scores.shape(1) / N::value();
    let base = row * scores.stride(0) / N::value();
    let dbase = row * dp.stride(0) / N::value();
    // pd and ds are contiguous: row r at r·t.
    let obase = row * tv;
    let query = start + row % tc;
    let bbase = query * bias.stride(0) / N::value();
    let unit = UNIT_POS_X as usize;
    let key_row = score_row(row, tc, query, bias.shape(0));
    let l = lse[key_row];
    let key = row_key(seed, key_row);
    let mut acc = f32::new(0.0);
    let mut c = unit;
    while c < tv {
        let pg = probs_and_grads(
            scores, bias, dp, base, bbase, dbase, c, scale, l, key, threshold, inv_keep, drop,
        );
        let prod = pg.0 * pg.1;
        #[unroll]
        for e in 0..N::value() {
            acc += prod.extract(e);
        }
        c += CUBE_DIM_X as usize;
    }
    let mut sh = Shared::<[f32]>::new_slice(UNITS);
    sh[unit] = acc;
    reduce_sum(&mut sh, unit);
    let total = sh[0];
    let mut c = unit;
    while c < tv {
        let pg = probs_and_grads(
            scores, bias, dp, base, bbase, dbase, c, scale, l, key, threshold, inv_keep, drop,
        );
        pd[obase + c] = Vector::cast_from(pg.0 * pg.2);
        ds[obase + c] = Vector::cast_from(pg.0 * (pg.1 - Vector::new(total)) * Vector::new(scale));
        c += CUBE_DIM_X as usize;
    }
}

/// For vector `c` of a row of [`softmax_grad_lse_kernel`]: `(p, g, m)` with `p = exp(x − l)`
/// (0 where the bias is a mask), `g = dp·m` (0 there too) and m the dropout factors (1 without).
#[cube]
#[allow(clippy::too_many_arguments)]
fn probs_and_grads<F: Float, B: Float, N: Size>(
    scores: &Tensor<Vector<F, N>>,
    bias: &Tensor<Vector<B, N>>,
    dp: &Tensor<Vector<F, N>>,
    base: usize,
    bbase: usize,
    dbase: usize,
    c: usize,
    scale: f32,
    l: f32,
    key: u32,
    threshold: u32,
    inv_keep: f32,
    #[comptime] drop: bool,
) -> (Vector<f32, N>, Vector<f32, N>, Vector<f32, N>) {
    let xv = logits(scores, bias, base, bbase, c, scale);
    let dv = Vector::<f32, N>::cast_from(dp[dbase + c]);
    let mut m = Vector::<f32, N>::new(1.0);
    if comptime![drop] {
        m = keep_factors::<N>(key, c * N::value(), threshold, inv_keep, SHIFT32);
    }
    let mut p = Vector::<f32, N>::new(0.0);
    let mut g = Vector::<f32, N>::new(0.0);
    #[unroll]
    for e in 0..N::value() {
        let x = xv.extract(e);
        let masked = x <= f32::new(-1.0e30);
        p.insert(e, select(masked, 0.0, (x - l).exp()));
        g.insert(e, select(masked, 0.0, dv.extract(e) * m.extract(e)));
    }
    (p, g, m)
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
    reduce_sum(&mut sh, unit);
    let total = sh[0];
    let mut c = unit;
    while c < t {
        let pv = f32::cast_from(p[base + c]);
        let g = pv * (f32::cast_from(dp[base + c]) - total) * scale;
        ds[base + c] = F::cast_from(g);
        c += UNITS;
    }
}

/// Rows of `src [a, b, c, d]` (any strides, d contiguous) to `dst` at vector
/// `off + i·ta + j·tb + k·tc` for row `(i, j, k)`, d contiguous there too: the attention's head
/// layout changes ([`RowKernels::swap_heads`], [`RowKernels::merge_heads`]) as one pass at memory
/// speed. One unit a vector of `N` elements, `total` vectors.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn copy_heads_kernel<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    dst: &mut Tensor<Vector<F, N>>,
    off: usize,
    ta: usize,
    tb: usize,
    tc: usize,
    total: usize,
    #[define(F)] _dtype: ElemType,
) {
    let pos = cube_row() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if pos >= total {
        terminate!();
    }
    let dv = src.shape(3) / N::value();
    let v = pos % dv;
    let row = pos / dv;
    let k = row % src.shape(2);
    let ij = row / src.shape(2);
    let j = ij % src.shape(1);
    let i = ij / src.shape(1);
    let at = (i * src.stride(0) + j * src.stride(1) + k * src.stride(2)) / N::value() + v;
    dst[off + i * ta + j * tb + k * tc + v] = src[at];
}

/// Σ of a vector's lanes.
#[cube]
fn lanes_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut s = f32::new(0.0);
    #[unroll]
    for e in 0..N::value() {
        s += v.extract(e);
    }
    s
}

/// LayerNorm per row of x `[rows, d]`, in f32: the mean, `rstd = 1/√(var + eps)` (biased var)
/// into `mean`, `rstd` `[rows, 1]` (f32) and `y = (x − mean)·rstd·gamma + beta` (x's dtype);
/// gamma, beta `[d]`. A cube a row, each unit holding `per` vectors of `N` (columns `N·(unit +
/// i·units) ..`) in registers: x is read once; two passes over them for the variance, as
/// PyTorch's kernel.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_kernel<F: Float, G: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<G, N>>,
    beta: &Tensor<Vector<G, N>>,
    y: &mut Tensor<Vector<F, N>>,
    mean: &mut Tensor<f32>,
    rstd: &mut Tensor<f32>,
    rows: usize,
    inv_d: f32,
    eps: f32,
    #[comptime] per: usize,
    #[define(F, G)] _dtypes: [ElemType; 2],
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let dv = x.shape(1) / N::value();
    let base = row * dv;
    let unit = UNIT_POS_X as usize;
    let units = CUBE_DIM_X as usize;
    let mut xs = Array::<Vector<f32, N>>::new(per);
    let mut acc = Vector::<f32, N>::new(0.0);
    #[unroll]
    for i in 0..per {
        let c = unit + i * units;
        let mut v = Vector::<f32, N>::new(0.0);
        if c < dv {
            v = Vector::cast_from(x[base + c]);
        }
        xs[i] = v;
        acc += v;
    }
    let mut sa = Shared::<[f32]>::new_slice(UNITS);
    sa[unit] = lanes_sum(acc);
    reduce_sum(&mut sa, unit);
    let mu = sa[0] * inv_d;
    let mut acc = Vector::<f32, N>::new(0.0);
    #[unroll]
    for i in 0..per {
        if unit + i * units < dv {
            let v = xs[i] - Vector::new(mu);
            acc += v * v;
        }
    }
    let mut sb = Shared::<[f32]>::new_slice(UNITS);
    sb[unit] = lanes_sum(acc);
    reduce_sum(&mut sb, unit);
    let r = 1.0 / f32::sqrt(sb[0] * inv_d + eps);
    if unit == 0 {
        mean[row] = mu;
        rstd[row] = r;
    }
    #[unroll]
    for i in 0..per {
        let c = unit + i * units;
        if c < dv {
            let v = (xs[i] - Vector::new(mu)) * Vector::new(r);
            let g = Vector::<f32, N>::cast_from(gamma[c]);
            let b = Vector::<f32, N>::cast_from(beta[c]);
            y[base + c] = Vector::cast_from(v * g + b);
        }
    }
}

/// LayerNorm's input gradient per row of x `[rows, d]` from [`layer_norm_kernel`]'s mean and rstd:
/// with `x̂ = (x − mean)·rstd` and `g = dy·gamma`, `dx = rstd·(g − mean(g) − x̂·mean(g·x̂))` (x's
/// dtype), in f32; x̂ and g held in registers as [`layer_norm_kernel`] holds x.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_grad_kernel<F: Float, G: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<G, N>>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    dy: &Tensor<Vector<F, N>>,
    dx: &mut Tensor<Vector<F, N>>,
    rows: usize,
    inv_d: f32,
    #[comptime] per: usize,
    #[define(F, G)] _dtypes: [ElemType; 2],
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let dv = x.shape(1) / N::value();
    let base = row * dv;
    let unit = UNIT_POS_X as usize;
    let units = CUBE_DIM_X as usize;
    let mu = Vector::<f32, N>::new(mean[row]);
    let r = Vector::<f32, N>::new(rstd[row]);
    let mut xhs = Array::<Vector<f32, N>>::new(per);
    let mut gs = Array::<Vector<f32, N>>::new(per);
    let mut sg = Vector::<f32, N>::new(0.0);
    let mut sgx = Vector::<f32, N>::new(0.0);
    #[unroll]
    for i in 0..per {
        let c = unit + i * units;
        let mut xh = Vector::<f32, N>::new(0.0);
        let mut g = Vector::<f32, N>::new(0.0);
        if c < dv {
            xh = (Vector::<f32, N>::cast_from(x[base + c]) - mu) * r;
            g = Vector::<f32, N>::cast_from(dy[base + c]) * Vector::<f32, N>::cast_from(gamma[c]);
        }
        xhs[i] = xh;
        gs[i] = g;
        sg += g;
        sgx += g * xh;
    }
    let mut sa = Shared::<[f32]>::new_slice(UNITS);
    let mut sb = Shared::<[f32]>::new_slice(UNITS);
    sa[unit] = lanes_sum(sg);
    sb[unit] = lanes_sum(sgx);
    reduce_sum2(&mut sa, &mut sb, unit);
    let mg = Vector::<f32, N>::new(sa[0] * inv_d);
    let mgx = Vector::<f32, N>::new(sb[0] * inv_d);
    #[unroll]
    for i in 0..per {
        let c = unit + i * units;
        if c < dv {
            dx[base + c] = Vector::cast_from(r * (gs[i] - mg - xhs[i] * mgx));
        }
    }
}

/// The LayerNorm kernels' layout for rows of `d` over `tensors`: the vector width `N`, the units
/// of a cube (about four vectors a unit, 32 to [`UNITS`], a power of two for the tree
/// reductions) and the vectors each unit holds.
fn norm_layout(d: usize, tensors: &[&CubeTensor]) -> (usize, usize, usize) {
    let n = vector_width_at(&[d], 4, 4, tensors);
    let dv = d / n;
    let units = dv.div_ceil(4).next_power_of_two().clamp(32, UNITS);
    (n, units, dv.div_ceil(units))
}

/// Units per row of the attention softmax kernels at `t` columns: four columns a unit, from 32 to
/// [`UNITS`] (a power of two, for the tree reductions). Query blocks of 256 keys
/// (`fused::query_blocks`) would idle 3/4 of a 256-unit cube.
fn softmax_units(t: usize) -> u32 {
    (t.div_ceil(4).next_power_of_two()).clamp(32, UNITS) as u32
}

/// `[rows, t]` of a tensor whose last dim is t (contiguous first, then a view).
fn as_rows(x: CubeTensor) -> (CubeTensor, usize, usize) {
    let shape = x.meta.shape.clone();
    let t = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / t.max(1);
    let x = CubeBackend::float_reshape(into_contiguous(x), Shape::new([rows, t]));
    (x, rows, t)
}

/// [`ce_rows_kernel`]; with `grad`, d `[s, rows, kp]` for `kp` (`s = ⌈v / kp⌉`).
fn launch_ce_rows(
    logits: CubeTensor,
    targets: CubeTensor,
    weights: CubeTensor,
    grad: Option<usize>,
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
    // Contiguous (not row-pitched): the head's input gradient reshapes it.
    let d = grad.map(|kp| {
        let shape = Shape::new([v.div_ceil(kp), rows, kp]);
        empty_device_contiguous_dtype(client.clone(), device.clone(), shape, logits.dtype)
    });
    // Without a gradient the kernel never touches `d`: a one-element stand-in.
    let d_arg = d.clone().unwrap_or_else(|| {
        empty_device_dtype(client.clone(), device, Shape::new([1, 1, 1]), logits.dtype)
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
            grad.is_some(),
            dtypes,
        );
    }
    (nll, d)
}

/// Hashed dropout as the kernels take it: the seed tensor (two uniforms), `keep·2³²`, `1/keep`
/// and whether to drop (without, a two-element stand-in the kernels never read).
pub(crate) struct DropArgs {
    pub(crate) seed: CubeTensor,
    pub(crate) threshold: u32,
    pub(crate) inv_keep: f32,
    pub(crate) drop: bool,
}

impl DropArgs {
    /// `drop`: the seed tensor `[2]` (f32) and `keep`, the probability to keep an element.
    pub(crate) fn new(drop: Option<(CubeTensor, f64)>, like: &CubeTensor) -> Self {
        match drop {
            Some((seed, keep)) => Self {
                seed: into_contiguous(CubeBackend::float_cast(seed, FloatDType::F32)),
                threshold: keep_threshold(keep),
                inv_keep: (1.0 / keep) as f32,
                drop: true,
            },
            None => Self {
                seed: empty_device_dtype(
                    like.client.clone(),
                    like.device.clone(),
                    Shape::new([2]),
                    DType::F32,
                ),
                threshold: 0,
                inv_keep: 1.0,
                drop: false,
            },
        }
    }
}

/// bias `[1, .., 1, seq, t]`, broadcast over the leading dims, as `[seq, t]` (unit column stride).
fn bias_rows(bias: CubeTensor) -> CubeTensor {
    let nb = bias.meta.num_dims();
    let [seq, t] = [bias.meta.shape[nb - 2], bias.meta.shape[nb - 1]];
    CubeBackend::float_reshape(into_contiguous(bias), Shape::new([seq, t]))
}

/// A block of scores `[.., tc, t]` of queries `start..start + tc` as the attention kernels take
/// it: the scores as `[rows, t]`, rows, t, tc and the bias as `[seq, seq]`, checked to hold the
/// block (the kernels read bias rows `start..start + tc` and columns `..t`).
fn score_block(
    scores: CubeTensor,
    bias: CubeTensor,
    start: usize,
) -> (CubeTensor, usize, usize, usize, CubeTensor) {
    let shape = &scores.meta.shape;
    let tc = shape[shape.num_dims() - 2];
    let (scores, rows, t) = as_rows(scores);
    let bias = bias_rows(bias);
    let [seq, width] = [bias.meta.shape[0], bias.meta.shape[1]];
    assert!(
        tc > 0 && start + tc <= seq && t <= width,
        "scores of queries {start}..{} and {t} keys outside the bias [{seq}, {width}]",
        start + tc
    );
    // The kernels read bias rows as vectors of consecutive columns.
    assert_eq!(bias.meta.strides()[1], 1, "bias columns of unit stride");
    (scores, rows, t, tc, bias)
}

pub(crate) fn launch_softmax_lse(
    scores: CubeTensor,
    bias: CubeTensor,
    start: usize,
    drop: Option<(CubeTensor, f64)>,
    scale: f64,
) -> (CubeTensor, CubeTensor) {
    let shape = scores.meta.shape.clone();
    let (scores, rows, t, tc, bias) = score_block(scores, bias, start);
    let drop = DropArgs::new(drop, &scores);
    let (client, device) = (scores.client.clone(), scores.device.clone());
    let p =
        empty_device_contiguous_dtype(client.clone(), device.clone(), shape.clone(), scores.dtype);
    let lse = empty_device_dtype(client.clone(), device, row_shape(&shape), DType::F32);
    let v = vector_width(
        &[t, scores.meta.strides()[0], bias.meta.strides()[0]],
        scores.dtype.size(),
        8,
    );
    let dtypes = [
        dtype_to_storage_type(scores.dtype),
        dtype_to_storage_type(bias.dtype),
    ];
    // Safety: rows `< rows`, columns `< t ≤ seq`, bias rows `start + r % tc < seq` (the
    // caller's blocks lie in the bias), seed indices 0 and 1.
    unsafe {
        softmax_lse_kernel::launch_unchecked(
            &client,
            row_cubes(rows),
            CubeDim::new_1d(softmax_units(t / v)),
            v,
            scores.into_tensor_arg(),
            bias.into_tensor_arg(),
            drop.seed.into_tensor_arg(),
            p.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            rows,
            tc,
            start,
            scale as f32,
            drop.threshold,
            drop.inv_keep,
            drop.drop,
            dtypes,
        );
    }
    (p, lse)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_softmax_grad_lse(
    scores: CubeTensor,
    bias: CubeTensor,
    start: usize,
    lse: CubeTensor,
    dp: CubeTensor,
    drop: Option<(CubeTensor, f64)>,
    scale: f64,
) -> (CubeTensor, CubeTensor) {
    let shape = dp.meta.shape.clone();
    let (scores, rows, t, tc, bias) = score_block(scores, bias, start);
    let (dp, _, _) = as_rows(dp);
    let lse = into_contiguous(lse);
    let seq = bias.meta.shape[0];
    assert_eq!(
        lse.meta.shape.num_elements(),
        rows / tc * seq,
        "the log-sum-exp of all {seq} queries"
    );
    let drop = DropArgs::new(drop, &scores);
    let (client, device) = (dp.client.clone(), dp.device.clone());
    let pd =
        empty_device_contiguous_dtype(client.clone(), device.clone(), shape.clone(), scores.dtype);
    let ds = empty_device_contiguous_dtype(client.clone(), device, shape, dp.dtype);
    let v = vector_width(
        &[
            t,
            scores.meta.strides()[0],
            dp.meta.strides()[0],
            bias.meta.strides()[0],
        ],
        scores.dtype.size(),
        8,
    );
    let dtypes = [
        dtype_to_storage_type(scores.dtype),
        dtype_to_storage_type(bias.dtype),
    ];
    // Safety: rows `< rows`, columns `< t ≤ seq`, bias rows `start + r % tc < seq` (the
    // caller's blocks lie in the bias), lse rows `(r / tc)·seq + start + r % tc < rows / tc · seq`,
    // seed indices 0 and 1.
    unsafe {
        softmax_grad_lse_kernel::launch_unchecked(
            &client,
            row_cubes(rows),
            CubeDim::new_1d(softmax_units(t / v)),
            v,
            scores.into_tensor_arg(),
            bias.into_tensor_arg(),
            lse.into_tensor_arg(),
            dp.into_tensor_arg(),
            drop.seed.into_tensor_arg(),
            pd.clone().into_tensor_arg(),
            ds.clone().into_tensor_arg(),
            rows,
            tc,
            start,
            scale as f32,
            drop.threshold,
            drop.inv_keep,
            drop.drop,
            dtypes,
        );
    }
    (pd, ds)
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

/// Units of a [`copy_heads_kernel`] cube.
const COPY_UNITS: usize = 256;

/// [`copy_heads_kernel`] from `src [a, b, c, d]` into `dst` (contiguous) at element offset `off`
/// and element strides `t` for src's first three dims.
fn launch_copy_heads(src: &CubeTensor, dst: &CubeTensor, off: usize, t: [usize; 3]) {
    let (shape, strides) = (&src.meta.shape, src.meta.strides());
    assert!(
        shape.num_dims() == 4 && strides[3] == 1,
        "copy_heads: a 4-d source with a contiguous last dim"
    );
    let lens = [
        shape[3], strides[0], strides[1], strides[2], off, t[0], t[1], t[2],
    ];
    let v = vector_width_at(&lens, src.dtype.size(), 8, &[src, dst]);
    let total = shape.num_elements() / v;
    if total == 0 {
        return;
    }
    // Safety: each vector `pos < total` reads src's row `(i, j, k)` (within its shape) and writes
    // dst at the caller's offset and strides (within dst by the callers' layouts).
    unsafe {
        copy_heads_kernel::launch_unchecked(
            &src.client,
            row_cubes(total.div_ceil(COPY_UNITS)),
            CubeDim::new_1d(COPY_UNITS as u32),
            v,
            src.clone().into_tensor_arg(),
            dst.clone().into_tensor_arg(),
            off / v,
            t[0] / v,
            t[1] / v,
            t[2] / v,
            total,
            dtype_to_storage_type(src.dtype),
        );
    }
}

/// `x [a, b, c, d]` (d contiguous) -> `[a, c, b, d]` contiguous.
fn launch_swap_heads(x: CubeTensor) -> CubeTensor {
    let [a, b, c, d] = x.meta.shape.dims::<4>();
    let out = empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::new([a, c, b, d]),
        x.dtype,
    );
    launch_copy_heads(&x, &out, 0, [c * b * d, d, b * d]);
    out
}

/// dq, dk, dv `[batch, head, seq, d]` (d contiguous) -> `[batch, seq, 3·head·d]`.
pub(crate) fn launch_merge_heads(parts: [CubeTensor; 3]) -> CubeTensor {
    let [b, h, t, d] = parts[0].meta.shape.dims::<4>();
    let out = empty_device_contiguous_dtype(
        parts[0].client.clone(),
        parts[0].device.clone(),
        Shape::new([b, t, 3 * h * d]),
        parts[0].dtype,
    );
    for (j, part) in parts.iter().enumerate() {
        assert_eq!(part.dtype, out.dtype, "merge_heads: one dtype");
        launch_copy_heads(part, &out, j * h * d, [t * 3 * h * d, d, 3 * h * d]);
    }
    out
}

fn launch_layer_norm(
    x: CubeTensor,
    gamma: CubeTensor,
    beta: CubeTensor,
    eps: f64,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let shape = x.meta.shape.clone();
    let (x, rows, d) = as_rows(x);
    let gamma = into_contiguous(gamma);
    let beta = into_contiguous(CubeBackend::float_cast(beta, gamma.dtype.into()));
    let (client, device) = (x.client.clone(), x.device.clone());
    let y = empty_device_dtype(client.clone(), device.clone(), shape.clone(), x.dtype);
    let stat = || {
        empty_device_dtype(
            client.clone(),
            device.clone(),
            row_shape(&shape),
            DType::F32,
        )
    };
    let (mean, rstd) = (stat(), stat());
    let dtypes = [
        dtype_to_storage_type(x.dtype),
        dtype_to_storage_type(gamma.dtype),
    ];
    let (n, units, per) = norm_layout(d, &[&x, &gamma, &beta, &y]);
    // Safety: rows `< rows`, vectors `< d / n` (gamma and beta `[d]`).
    unsafe {
        layer_norm_kernel::launch_unchecked(
            &client,
            row_cubes(rows),
            CubeDim::new_1d(units as u32),
            n,
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            beta.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            mean.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            rows,
            1.0 / d as f32,
            eps as f32,
            per,
            dtypes,
        );
    }
    (y, mean, rstd)
}

fn launch_layer_norm_grad(
    x: CubeTensor,
    gamma: CubeTensor,
    mean: CubeTensor,
    rstd: CubeTensor,
    dy: CubeTensor,
) -> CubeTensor {
    let shape = x.meta.shape.clone();
    let dtype = x.dtype;
    let (x, rows, d) = as_rows(x);
    let (dy, _, _) = as_rows(CubeBackend::float_cast(dy, dtype.into()));
    let gamma = into_contiguous(gamma);
    let (mean, rstd) = (into_contiguous(mean), into_contiguous(rstd));
    let (client, device) = (x.client.clone(), x.device.clone());
    let dx = empty_device_dtype(client.clone(), device, shape, dtype);
    let dtypes = [
        dtype_to_storage_type(dtype),
        dtype_to_storage_type(gamma.dtype),
    ];
    let (n, units, per) = norm_layout(d, &[&x, &gamma, &dy, &dx]);
    // Safety: rows `< rows`, vectors `< d / n` (gamma `[d]`).
    unsafe {
        layer_norm_grad_kernel::launch_unchecked(
            &client,
            row_cubes(rows),
            CubeDim::new_1d(units as u32),
            n,
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            mean.into_tensor_arg(),
            rstd.into_tensor_arg(),
            dy.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            rows,
            1.0 / d as f32,
            per,
            dtypes,
        );
    }
    dx
}

/// `shape` with its last dim 1: one value per row.
fn row_shape(shape: &Shape) -> Shape {
    let mut shape = shape.clone();
    let last = shape.num_dims() - 1;
    shape[last] = 1;
    shape
}

/// One f32 value per row of `t` (`[.., 1]`): the kernels' per-row outputs (log-sum-exp, loss,
/// LayerNorm's mean and rstd).
fn row_stat_spec(t: &TensorSpec) -> TensorSpec {
    TensorSpec::new(row_shape(&t.shape), DType::F32)
}

/// `[⌈v / kp⌉, rows, kp]` for logits `[rows, v]`, their dtype: [`RowKernels::ce_rows`]'s gradient.
fn sliced_spec(logits: &TensorSpec, kp: usize) -> TensorSpec {
    let [rows, v] = [logits.shape[0], logits.shape[1]];
    TensorSpec::new(Shape::new([v.div_ceil(kp), rows, kp]), logits.dtype)
}

/// `[a, c, b, d]` for x `[a, b, c, d]`, its dtype: [`RowKernels::swap_heads`].
fn swapped_spec(x: &TensorSpec) -> TensorSpec {
    let [a, b, c, d] = x.shape.dims::<4>();
    TensorSpec::new(Shape::new([a, c, b, d]), x.dtype)
}

/// `[batch, seq, 3·head·d]` for dq `[batch, head, seq, d]`: [`RowKernels::merge_heads`].
fn merged_spec(dq: &TensorSpec) -> TensorSpec {
    let [b, h, t, d] = dq.shape.dims::<4>();
    TensorSpec::new(Shape::new([b, t, 3 * h * d]), dq.dtype)
}

/// Row kernels on cubecl.
#[backend_extension(Cube, Fusion)]
pub trait RowKernels: Backend {
    /// `softmax(scores·scale + bias)` over the last dim and its log-sum-exp: scores
    /// `[.., tc, t]`, the rows of queries `start..start + tc` of bias `[1, .., 1, seq, seq]`
    /// (`start + tc ≤ seq`, `t ≤ seq`) -> p (scores' shape and dtype) and lse `[.., tc, 1]` (f32).
    #[fusion(meta = |scores, _bias, _start, _scale| (scores.clone(), row_stat_spec(scores)))]
    fn softmax_lse(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Softmax's backward pass over the last dim, times `scale`: `p·(dp − Σ dp·p)·scale`, p and dp
    /// of one shape and dtype.
    #[fusion(dtype = dp, shape = dp)]
    fn softmax_grad(p: FloatTensor<Self>, dp: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;

    /// [`softmax_lse`](Self::softmax_lse) with hashed dropout: p times the `{0, 1/keep}` mask drawn
    /// from `seed` (`[2]` f32 uniforms) and each element's position in the whole `[seq, seq]`
    /// scores, and the lse of p before it.
    #[fusion(meta = |scores, _bias, _start, _seed, _scale, _keep| (scores.clone(), row_stat_spec(scores)))]
    fn softmax_lse_hashed(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The backward pass of [`softmax_lse_hashed`](Self::softmax_lse_hashed) from the lse of all
    /// query blocks, `[.., seq, 1]`: with `p = exp(scores·scale + bias − lse)` again, the dropped probabilities
    /// `p·mask` and the softmax backward `p·(g − Σ p·g)·scale` for `g = dp·mask`; dp of the
    /// scores' shape and dtype.
    #[fusion(meta = |scores, _bias, _start, _lse, dp, _seed, _scale, _keep| (scores.clone(), dp.clone()))]
    #[allow(clippy::too_many_arguments)]
    fn softmax_grad_hashed(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        start: usize,
        lse: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// LayerNorm over the last dim in f32: x `[.., d]`, gamma, beta `[d]` -> y (x's shape and
    /// dtype) and per row the mean and `rstd = 1/√(var + eps)` `[.., 1]` (f32).
    #[fusion(meta = |x, _gamma, _beta, _eps| (x.clone(), row_stat_spec(x), row_stat_spec(x)))]
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// LayerNorm's input gradient from [`layer_norm`](Self::layer_norm)'s mean and rstd: x, dy
    /// `[.., d]` -> dx (x's shape and dtype).
    #[fusion(dtype = x, shape = x)]
    fn layer_norm_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// `x [a, b, c, d]` (any strides, d contiguous) -> `[a, c, b, d]` contiguous: heads to rows and
    /// back in one pass.
    #[fusion(meta = |x| swapped_spec(x))]
    fn swap_heads(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Causal attention of q, k, v `[batch, head, seq, d]` (the causal `bias [1, 1, seq, seq]`),
    /// with hashed dropout drawn from `seed` (`[2]` f32 uniforms) where `keep < 1` ->
    /// `[batch, seq, head, d]` (contiguous) and the log-sum-exp `[batch, head, seq, 1]` (f32):
    /// one kernel ([`crate::flash`]) for heads of 64, else the scores and the softmax kernel.
    #[fusion(meta = |q, _k, _v, _bias, _seed, _scale, _keep| (swapped_spec(q), row_stat_spec(q)))]
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The backward pass of [`flash_attention`](Self::flash_attention): the gradient w.r.t. the
    /// heads side by side, `[batch, seq, 3·head·d]` (q's heads, then k's, then v's), from q, k,
    /// v, the output o and its gradient dy `[batch, head, seq, d]` (any strides, d contiguous) and
    /// the log-sum-exp: for heads of 64, `crate::flash_cm`'s kernels in f16 where the device has
    /// workgroup-scope matrices, else [`crate::flash`]'s three; else the scores, the
    /// softmax-gradient kernel and matmuls.
    #[fusion(meta = |q, _k, _v, _o, _lse, _dy, _bias, _seed, _scale, _keep| merged_spec(q))]
    #[allow(clippy::too_many_arguments)]
    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
    ) -> FloatTensor<Self>;

    /// The attention's input gradient from dq, dk, dv `[batch, head, seq, d]` (one dtype, d
    /// contiguous): `[batch, seq, 3·head·d]`, q's heads then k's then v's.
    #[fusion(meta = |dq, _dk, _dv| merged_spec(dq))]
    fn merge_heads(
        dq: FloatTensor<Self>,
        dk: FloatTensor<Self>,
        dv: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// logits `[rows, v]`, targets `[rows, 1]` (each `< v`), weights `[rows, 1]` (f32) ->
    /// `w·nll [rows, 1]` (f32) and `w·(softmax − onehot)` (the logits' dtype) as
    /// `[⌈v / kp⌉, rows, kp]`: the vocabulary in slices of `kp`, the last padded with zeros.
    #[fusion(meta = |logits, _targets, _weights, kp| (row_stat_spec(logits), sliced_spec(logits, *kp)))]
    fn ce_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        kp: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// [`ce_rows`](Self::ce_rows)'s `w·nll [rows, 1]` alone.
    #[fusion(meta = |logits, _targets, _weights| row_stat_spec(logits))]
    fn ce_rows_loss(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

impl RowKernels for CubeBackend {
    fn softmax_lse(
        scores: CubeTensor,
        bias: CubeTensor,
        start: usize,
        scale: f64,
    ) -> (CubeTensor, CubeTensor) {
        launch_softmax_lse(scores, bias, start, None, scale)
    }

    fn softmax_lse_hashed(
        scores: CubeTensor,
        bias: CubeTensor,
        start: usize,
        seed: CubeTensor,
        scale: f64,
        keep: f64,
    ) -> (CubeTensor, CubeTensor) {
        launch_softmax_lse(scores, bias, start, Some((seed, keep)), scale)
    }

    #[allow(clippy::too_many_arguments)]
    fn softmax_grad_hashed(
        scores: CubeTensor,
        bias: CubeTensor,
        start: usize,
        lse: CubeTensor,
        dp: CubeTensor,
        seed: CubeTensor,
        scale: f64,
        keep: f64,
    ) -> (CubeTensor, CubeTensor) {
        launch_softmax_grad_lse(scores, bias, start, lse, dp, Some((seed, keep)), scale)
    }

    fn softmax_grad(p: CubeTensor, dp: CubeTensor, scale: f64) -> CubeTensor {
        launch_softmax_grad(p, dp, scale)
    }

    fn layer_norm(
        x: CubeTensor,
        gamma: CubeTensor,
        beta: CubeTensor,
        eps: f64,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        launch_layer_norm(x, gamma, beta, eps)
    }

    fn layer_norm_grad(
        x: CubeTensor,
        gamma: CubeTensor,
        mean: CubeTensor,
        rstd: CubeTensor,
        dy: CubeTensor,
    ) -> CubeTensor {
        launch_layer_norm_grad(x, gamma, mean, rstd, dy)
    }

    fn ce_rows(
        logits: CubeTensor,
        targets: CubeTensor,
        weights: CubeTensor,
        kp: usize,
    ) -> (CubeTensor, CubeTensor) {
        let (nll, d) = launch_ce_rows(logits, targets, weights, Some(kp));
        (nll, d.expect("asked for the gradient"))
    }

    fn ce_rows_loss(logits: CubeTensor, targets: CubeTensor, weights: CubeTensor) -> CubeTensor {
        launch_ce_rows(logits, targets, weights, None).0
    }

    fn swap_heads(x: CubeTensor) -> CubeTensor {
        launch_swap_heads(x)
    }

    fn flash_attention(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        bias: CubeTensor,
        seed: CubeTensor,
        scale: f64,
        keep: f64,
    ) -> (CubeTensor, CubeTensor) {
        let drop = (keep < 1.0).then_some((seed, keep));
        crate::flash_cm::flash_forward_cm(&q, &k, &v, drop.clone(), scale)
            .or_else(|| {
                crate::flash::flash_forward(q.clone(), k.clone(), v.clone(), drop.clone(), scale)
            })
            .unwrap_or_else(|| crate::flash::materialised(q, k, v, bias, drop, scale))
    }

    #[allow(clippy::too_many_arguments)]
    fn flash_attention_backward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        o: CubeTensor,
        lse: CubeTensor,
        dy: CubeTensor,
        bias: CubeTensor,
        seed: CubeTensor,
        scale: f64,
        keep: f64,
    ) -> CubeTensor {
        let drop = (keep < 1.0).then_some((seed, keep));
        if let Some(d) =
            crate::flash_cm::flash_backward_cm(&q, &k, &v, &o, &lse, &dy, drop.clone(), scale)
        {
            return d;
        }
        let (q2, k2, v2, lse2, dy2) = (q.clone(), k.clone(), v.clone(), lse.clone(), dy.clone());
        crate::flash::flash_backward(q, k, v, o, lse, dy, drop.clone(), scale).unwrap_or_else(
            || crate::flash::materialised_backward(q2, k2, v2, lse2, dy2, bias, drop, scale),
        )
    }

    fn merge_heads(dq: CubeTensor, dk: CubeTensor, dv: CubeTensor) -> CubeTensor {
        launch_merge_heads([dq, dk, dv])
    }
}
