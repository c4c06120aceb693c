//! CubeCL kernels of the fused LoRA linear ([`crate::fused`]), for GPUs: the adapter's two thin
//! products with their neighbours, one kernel each.
//!
//! Composed from Burn's ops, the adapter of a GPT-2 `c_attn` (8192 tokens, r 8, f16, H100) took
//! ~0.2 ms forward and ~0.2 ms backward per layer: the hashed dropout of x as Burn's int ops
//! (52 µs), `[tokens, r]`-wide products that leave most of the GPU idle (28–77 µs each), the
//! scaling, and two separate adds of the bias and the adapter's output over `[tokens, 2304]`.
//! [`lora_down_kernel`] reads each row of its input once (dropout drawn inside, as
//! `lora_core::dropout::hashed` draws it); [`lora_up_kernel`] writes the output once, adding the
//! base product, the bias and `xa·Bᵀ` (times the dropout mask in the backward pass).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};
use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Cubes along a grid's x (or y) before the next dimension is used.
const MAX_X: usize = 65_535;

/// This cube's row on the 2-D grid of [`row_cubes`].
#[cube]
pub fn cube_row() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

/// One cube per row, `rows` of them over a 2-D grid.
pub fn row_cubes(rows: usize) -> CubeCount {
    let x = rows.clamp(1, MAX_X);
    CubeCount::Static(x as u32, rows.div_ceil(x).max(1) as u32, 1)
}
/// Units of [`lora_up_kernel`]'s cubes, and the rows each unit writes.
const UP_UNITS: usize = 64;
const UP_ROWS: usize = 8;
/// The largest rank the kernels take (r f32 registers a unit, `r · 128` shared f32 in
/// [`lora_down_kernel`]); larger ranks run as Burn's ops.
pub(crate) const MAX_RANK: usize = 32;

/// A 32-bit integer hash (Wellons' `lowbias32`), the mixing step of hashed dropout;
/// [`crate::dropout::mix32`] computes the same on the host.
#[cube]
pub fn mix32(x: u32) -> u32 {
    let mut x = x;
    x ^= x >> 16u32;
    x *= 0x7feb_352du32;
    x ^= x >> 15u32;
    x *= 0x846c_a68bu32;
    x ^= x >> 16u32;
    x
}

/// Column `j` of a 4 × 4 block held as four row vectors: `[regs[0][j], .., regs[3][j]]` (the
/// block transposed a vector at a time, for stores into shared memory).
#[cube]
pub fn lane_column<N: Size>(regs: &Array<Vector<f32, N>>, #[comptime] j: usize) -> Vector<f32, N> {
    let mut w = Vector::<f32, N>::empty();
    #[unroll]
    for i in 0..4 {
        w.insert(i, regs[i].extract(j));
    }
    w
}

/// Hashed dropout's key of row `row`: `mix32(mix32(row ^ s0) + s1)`, with the seed's two
/// uniforms in `[0, 1)` (24-bit multiples of 2⁻²⁴, as Burn draws them) times 2²⁴ as `s0, s1`
/// ([`crate::dropout::hashed_kept`]).
#[cube]
pub fn row_key(seed: &Tensor<f32>, row: usize) -> u32 {
    let s0 = u32::cast_from(seed[0] * 16_777_216.0);
    let s1 = u32::cast_from(seed[1] * 16_777_216.0);
    mix32(mix32(u32::cast_from(row) ^ s0) + s1)
}

/// Hashed dropout's factor of element `col` of the row with key `key` ([`row_key`]): `1/keep`
/// when `mix32(col ^ key) >> shift` is below `threshold`, else 0. lora-core's dropouts keep the
/// top 24 bits (`shift` 8, `threshold = keep·2²⁴`, [`crate::dropout::keep_threshold24`]);
/// lora-gpt's attention kernels all 32 (`shift` 0, `threshold = keep·2³²`).
#[cube]
pub fn keep_factor(
    key: u32,
    col: usize,
    threshold: u32,
    inv_keep: f32,
    #[comptime] shift: u32,
) -> f32 {
    select(
        (mix32(u32::cast_from(col) ^ key) >> shift) < threshold,
        inv_keep,
        0.0,
    )
}

/// [`keep_factor`] of the `N` elements from column `c` of the row with key `key`.
#[cube]
pub fn keep_factors<N: Size>(
    key: u32,
    c: usize,
    threshold: u32,
    inv_keep: f32,
    #[comptime] shift: u32,
) -> Vector<f32, N> {
    let mut m = Vector::<f32, N>::empty();
    #[unroll]
    for e in 0..N::value() {
        m.insert(e, keep_factor(key, c + e, threshold, inv_keep, shift));
    }
    m
}

/// The shift of lora-core's 24-bit hash rule ([`keep_factor`]).
const SHIFT24: u32 = 8;

/// Per row i of x `[rows, k]`: `xa[i, j] = scale · Σ_c m(i, c)·x[i, c]·a[j, c]` for the r rows of
/// a `[r, k]`, with m the hashed dropout factor ([`keep_factor`]) when `drop`, else 1; with
/// `write_xd` also `xd[i, c] = m·x[i, c]`. One cube takes `rows_per` rows, so each vector of a it
/// loads serves all of them (one row a cube re-read the whole of a per row: r times the row's own
/// traffic). x, a and xd are read and written `N` elements at a time (k a multiple of `N`); each
/// unit sums its columns in `rows_per · r` f32 registers, then a tree reduction in shared memory.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
// `if comptime![..] { if runtime {..} }`: the outer test is resolved when the kernel is compiled.
#[allow(clippy::collapsible_if)]
fn lora_down_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    a: &Tensor<Vector<F, N>>,
    seed: &Tensor<f32>,
    xa: &mut Tensor<F>,
    xd: &mut Tensor<Vector<F, N>>,
    rows: usize,
    scale: f32,
    threshold: u32,
    inv_keep: f32,
    #[comptime] r: usize,
    #[comptime] units: usize,
    #[comptime] rows_per: usize,
    #[comptime] drop: bool,
    #[comptime] write_xd: bool,
    #[define(F)] _dtype: ElemType,
) {
    let row0 = cube_row() * rows_per;
    if row0 >= rows {
        terminate!();
    }
    let kv = x.shape(1) / N::value();
    let xs = x.stride(0) / N::value();
    let xds = xd.stride(0) / N::value();
    let astride = a.stride(0) / N::value();
    let unit = UNIT_POS_X as usize;
    // Rows past the end read the last row (in bounds); their sums are not written.
    let mut xrow = Array::<usize>::new(rows_per);
    let mut keys = Array::<u32>::new(rows_per);
    #[unroll]
    for q in 0..rows_per {
        let row = select(row0 + q < rows, row0 + q, rows - 1);
        xrow[q] = row;
        keys[q] = 0u32;
        if comptime![drop] {
            keys[q] = row_key(seed, row);
        }
    }
    let mut acc = Array::<f32>::new(comptime!(rows_per * r));
    #[unroll]
    for t in 0..rows_per * r {
        acc[t] = 0.0;
    }
    let mut xv = Array::<Vector<f32, N>>::new(rows_per);
    let mut c = unit;
    while c < kv {
        #[unroll]
        for q in 0..rows_per {
            let row = xrow[q];
            let mut v = Vector::<f32, N>::cast_from(x[row * xs + c]);
            if comptime![drop] {
                v *= keep_factors::<N>(keys[q], c * N::value(), threshold, inv_keep, SHIFT24);
            }
            if comptime![write_xd] {
                if row0 + q < rows {
                    xd[row * xds + c] = Vector::cast_from(v);
                }
            }
            xv[q] = v;
        }
        #[unroll]
        for j in 0..r {
            let av = Vector::<f32, N>::cast_from(a[j * astride + c]);
            #[unroll]
            for q in 0..rows_per {
                let p = xv[q] * av;
                let mut sum = acc[q * r + j];
                #[unroll]
                for e in 0..N::value() {
                    sum += p.extract(e);
                }
                acc[q * r + j] = sum;
            }
        }
        c += units;
    }
    let mut sh = Shared::<[f32]>::new_slice(comptime!(rows_per * r * units));
    #[unroll]
    for t in 0..rows_per * r {
        sh[t * units + unit] = acc[t];
    }
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if unit < half {
            #[unroll]
            for t in 0..rows_per * r {
                let sum = sh[t * units + unit] + sh[t * units + unit + half];
                sh[t * units + unit] = sum;
            }
        }
        sync_cube();
        half /= 2;
    }
    let xas = xa.stride(0);
    let mut t = unit;
    while t < comptime!(rows_per * r) {
        let row = row0 + t / r;
        if row < rows {
            xa[row * xas + t % r] = F::cast_from(sh[t * units] * scale);
        }
        t += units;
    }
}

/// `out[i, c] = base[i, c] + bias[c] + m(i, c) · Σ_j xa[i, j]·bt[j, c]` over `[rows, n]`: xa
/// `[rows, r]`, bt `[r, n]`, bias `[n]` when `with_bias`, m the hashed dropout factor
/// ([`keep_factor`]) when `drop`, else 1. base, bias, bt and out are read and written `N` columns
/// at a time (n a multiple of `N`). Each unit writes `cols` vectors of columns (`CUBE_DIM_X`
/// vectors apart) of `rows_per` rows, their `bt` columns held in registers; f32 arithmetic, one
/// rounding.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn lora_up_kernel<F: Float, N: Size>(
    base: &Tensor<Vector<F, N>>,
    bias: &Tensor<Vector<F, N>>,
    xa: &Tensor<F>,
    bt: &Tensor<Vector<F, N>>,
    seed: &Tensor<f32>,
    out: &mut Tensor<Vector<F, N>>,
    rows: usize,
    threshold: u32,
    inv_keep: f32,
    #[comptime] r: usize,
    #[comptime] cols: usize,
    #[comptime] rows_per: usize,
    #[comptime] with_bias: bool,
    #[comptime] drop: bool,
    #[define(F)] _dtype: ElemType,
) {
    let nv = out.shape(1) / N::value();
    let step = CUBE_DIM_X as usize;
    let c0 = CUBE_POS_X as usize * step * cols + UNIT_POS_X as usize;
    let row0 = (CUBE_POS_Z as usize * CUBE_COUNT_Y as usize + CUBE_POS_Y as usize) * rows_per;
    let bstride = bt.stride(0) / N::value();
    let mut w = Array::<Vector<f32, N>>::new(comptime!(r * cols));
    let mut bv = Array::<Vector<f32, N>>::new(cols);
    #[unroll]
    for i in 0..cols {
        // Vectors past the row's end load vector 0 (in bounds) and are not written.
        let c = c0 + i * step;
        let cc = select(c < nv, c, 0);
        #[unroll]
        for j in 0..r {
            w[i * r + j] = Vector::cast_from(bt[j * bstride + cc]);
        }
        bv[i] = Vector::new(0.0);
        if comptime![with_bias] {
            bv[i] = Vector::cast_from(bias[cc]);
        }
    }
    let mut xr = Array::<f32>::new(r);
    for q in 0..rows_per {
        let row = row0 + q;
        if row < rows {
            let arow = row * xa.stride(0);
            let brow = row * base.stride(0) / N::value();
            let orow = row * out.stride(0) / N::value();
            #[unroll]
            for j in 0..r {
                xr[j] = f32::cast_from(xa[arow + j]);
            }
            let mut key = 0u32;
            if comptime![drop] {
                key = row_key(seed, row);
            }
            #[unroll]
            for i in 0..cols {
                let c = c0 + i * step;
                if c < nv {
                    let mut acc = Vector::<f32, N>::new(0.0);
                    #[unroll]
                    for j in 0..r {
                        acc += Vector::new(xr[j]) * w[i * r + j];
                    }
                    if comptime![drop] {
                        acc *= keep_factors::<N>(key, c * N::value(), threshold, inv_keep, SHIFT24);
                    }
                    acc += Vector::<f32, N>::cast_from(base[brow + c]) + bv[i];
                    out[orow + c] = Vector::cast_from(acc);
                }
            }
        }
    }
}

/// Hashed dropout as the kernels take it: the seed `[2]` as f32, `keep·2²⁴` and `1/keep`, and
/// whether to drop (`keep < 1`).
fn drop_args(seed: CubeTensor, keep: f64) -> (CubeTensor, u32, f32, bool) {
    let drop = keep < 1.0;
    let seed = match drop {
        true => into_contiguous(CubeBackend::float_cast(seed, FloatDType::F32)),
        // Never read: any `[2]` f32 stand-in.
        false => empty_device_dtype(
            seed.client.clone(),
            seed.device.clone(),
            Shape::new([2]),
            DType::F32,
        ),
    };
    let threshold = crate::dropout::keep_threshold24(keep.min(1.0));
    (seed, threshold, (1.0 / keep) as f32, drop)
}

/// Elements a kernel reads and writes at once along rows: 16 bytes (8 f16 or 4 f32), fewer where
/// a row length or row stride in `lens` is not a multiple, and at most `max` (lora-gpt's row
/// kernels use it too).
pub fn vector_width(lens: &[usize], elem_bytes: usize, max: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .find(|&v| v * elem_bytes <= 16 && v <= max && lens.iter().all(|l| l.is_multiple_of(v)))
        .unwrap_or(1)
}

/// [`vector_width`] for `tensors` read in vectors from their first element: each one's start offset
/// (in its elements) must be a multiple too.
pub fn vector_width_at(
    lens: &[usize],
    elem_bytes: usize,
    max: usize,
    tensors: &[&CubeTensor],
) -> usize {
    let starts = tensors
        .iter()
        .map(|t| t.handle.offset_start.unwrap_or(0) as usize / t.dtype.size());
    let lens = lens.iter().copied().chain(starts).collect::<Vec<_>>();
    vector_width(&lens, elem_bytes, max)
}

/// Vector registers of f32 a unit may hold for the kernels' sums and B's columns.
const VECTOR_REGS: usize = 64;

/// Units of a [`lora_down_kernel`] cube for rows of `kv` vectors: about four vectors a unit, 32 to
/// 64 (a power of two, for the tree reduction).
fn down_units(kv: usize) -> usize {
    kv.div_ceil(4).next_power_of_two().clamp(32, 64)
}

/// Rows a [`lora_down_kernel`] cube takes for rows of `kv` vectors of `elem_bytes` elements (fewer
/// at ranks above 8). In f16, 4 for wide rows, where a's traffic dominates; 2 for narrow ones,
/// where 4 left too few units running (GPT-2's `[8192, 768]` f16 input: 32 µs against 28 with one
/// row a cube, H100). In f32, 2 (GPT-2's `[8192, 768]` input 52 → 46 µs, the `[8192, 2304]`
/// output gradient 39 → 32 µs against 4 rows; 48 and 32 µs with one; H100, 2026-11-24).
fn down_rows(kv: usize, elem_bytes: usize) -> usize {
    if elem_bytes >= 4 || kv < 192 { 2 } else { 4 }
}

/// Vectors of columns a [`lora_up_kernel`] unit writes at rank r and width `v`: its `bt`
/// registers, `r · cols · v` f32, stay ≤ [`VECTOR_REGS`].
fn up_cols(r: usize, v: usize) -> usize {
    (VECTOR_REGS / (r.max(1) * v)).clamp(1, 4)
}

fn launch_down(
    x: CubeTensor,
    a: CubeTensor,
    seed: CubeTensor,
    scale: f64,
    keep: f64,
    write_xd: bool,
) -> (CubeTensor, Option<CubeTensor>) {
    let (x, a) = (into_contiguous(x), into_contiguous(a));
    let [rows, k] = x.meta.shape.dims::<2>();
    let r = a.meta.shape[0];
    assert!(
        r <= MAX_RANK && a.meta.shape[1] == k,
        "lora_down: a [{r}, {k}]"
    );
    let (seed, threshold, inv_keep, drop) = drop_args(seed, keep);
    let (client, device) = (x.client.clone(), x.device.clone());
    let xa = empty_device_dtype(
        client.clone(),
        device.clone(),
        Shape::new([rows, r]),
        x.dtype,
    );
    let v = vector_width(
        &[k, x.meta.strides()[0], a.meta.strides()[0]],
        x.dtype.size(),
        8,
    );
    // `rows_per · r` f32 sums a unit, at most 32.
    let rows_per = (MAX_RANK / r.max(1)).clamp(1, down_rows(k / v, x.dtype.size()));
    // Without `write_xd` the kernel never touches xd: a one-vector stand-in.
    let xd_shape = if write_xd { [rows, k] } else { [1, v] };
    let xd = empty_device_dtype(client.clone(), device, Shape::new(xd_shape), x.dtype);
    let units = down_units(k / v);
    let dtype = dtype_to_storage_type(x.dtype);
    // Safety: rows `< rows`, columns `< k`, a's rows `< r`, seed indices 0 and 1.
    unsafe {
        lora_down_kernel::launch_unchecked(
            &client,
            row_cubes(rows.div_ceil(rows_per)),
            CubeDim::new_1d(units as u32),
            v,
            x.into_tensor_arg(),
            a.into_tensor_arg(),
            seed.into_tensor_arg(),
            xa.clone().into_tensor_arg(),
            xd.clone().into_tensor_arg(),
            rows,
            scale as f32,
            threshold,
            inv_keep,
            r,
            units,
            rows_per,
            drop,
            write_xd,
            dtype,
        );
    }
    (xa, write_xd.then_some(xd))
}

fn launch_up(
    base: CubeTensor,
    bias: Option<CubeTensor>,
    xa: CubeTensor,
    bt: CubeTensor,
    seed: CubeTensor,
    keep: f64,
) -> CubeTensor {
    let dtype = base.dtype;
    let (base, xa) = (into_contiguous(base), into_contiguous(xa));
    let bt = into_contiguous(CubeBackend::float_cast(bt, dtype.into()));
    let [rows, n] = base.meta.shape.dims::<2>();
    let r = xa.meta.shape[1];
    assert!(
        r <= MAX_RANK && xa.meta.shape[0] == rows && bt.meta.shape.dims::<2>() == [r, n],
        "lora_up: xa {:?}, bt {:?} for [{rows}, {n}]",
        xa.meta.shape,
        bt.meta.shape
    );
    let (seed, threshold, inv_keep, drop) = drop_args(seed, keep);
    let (client, device) = (base.client.clone(), base.device.clone());
    let with_bias = bias.is_some();
    let out = empty_device_dtype(client.clone(), device.clone(), Shape::new([rows, n]), dtype);
    let v = vector_width(
        &[
            n,
            base.meta.strides()[0],
            bt.meta.strides()[0],
            out.meta.strides()[0],
        ],
        dtype.size(),
        VECTOR_REGS / r.max(1),
    );
    let bias = match bias {
        Some(b) => into_contiguous(CubeBackend::float_cast(b, dtype.into())),
        // Never read: a one-vector stand-in.
        None => empty_device_dtype(client.clone(), device, Shape::new([v]), dtype),
    };
    let cols = up_cols(r, v);
    // Fewer units where a row's vectors would leave most of a 64-unit cube idle.
    let units = if (n / v).is_multiple_of(UP_UNITS * cols) {
        UP_UNITS
    } else {
        UP_UNITS / 2
    };
    let groups = rows.div_ceil(UP_ROWS);
    let ys = groups.clamp(1, MAX_X);
    let cubes = CubeCount::Static(
        (n / v).div_ceil(units * cols) as u32,
        ys as u32,
        groups.div_ceil(ys) as u32,
    );
    // Safety: columns `< n` (bias `[n]`, bt `[r, n]`), rows `< rows`, xa's columns `< r`.
    unsafe {
        lora_up_kernel::launch_unchecked(
            &client,
            cubes,
            CubeDim::new_1d(units as u32),
            v,
            base.into_tensor_arg(),
            bias.into_tensor_arg(),
            xa.into_tensor_arg(),
            bt.into_tensor_arg(),
            seed.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            threshold,
            inv_keep,
            r,
            cols,
            UP_ROWS,
            with_bias,
            drop,
            dtype_to_storage_type(dtype),
        );
    }
    out
}

/// Rows of one part of a [`thin_tn_kernel`] reduction, and the units of its cubes.
const THIN_ROWS: usize = 128;
const THIN_UNITS: usize = 64;
/// The widest thin side [`AdapterKernels::thin_tn`] takes: m f32 vectors of sums a unit.
pub const THIN_MAX: usize = 16;

/// Part `CUBE_POS_Y` of `aᵀ·b`, rows `part_rows·y ..`: a `[rows, m]` (any strides), b `[rows, n]`
/// read `N` columns at a time -> `out [parts, m, n]` (f32). Unit `x` of the grid sums columns
/// `N·x ..` for all m rows of the output; the part's rows of a are staged in shared memory. LoRA's
/// gradients `[r, n]` over thousands of tokens: one pass over b at memory speed. With `normed`, b
/// is a LayerNorm's input and the product takes its output `(b − mean)·rstd·gamma + beta`
/// (mean, rstd `[rows]` f32, gamma, beta `[n]`; rounded to b's dtype, as the norm's kernel
/// writes it); with `drop`, times hashed dropout ([`keep_factor`], as [`lora_down_kernel`]
/// draws it).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn thin_tn_kernel<F: Float, G: Float, N: Size>(
    a: &Tensor<F>,
    b: &Tensor<Vector<F, N>>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    gamma: &Tensor<Vector<G, N>>,
    beta: &Tensor<Vector<G, N>>,
    seed: &Tensor<f32>,
    out: &mut Tensor<Vector<f32, N>>,
    threshold: u32,
    inv_keep: f32,
    #[comptime] m: usize,
    #[comptime] part_rows: usize,
    #[comptime] normed: bool,
    #[comptime] drop: bool,
    #[define(F, G)] _dtypes: [ElemType; 2],
) {
    let rows = b.shape(0);
    let nv = b.shape(1) / N::value();
    let r0 = CUBE_POS_Y as usize * part_rows;
    let len = (rows - r0).min(part_rows);
    let mut sh = Shared::<[f32]>::new_slice(comptime!(part_rows * m));
    // Per row: the norm's mean and rstd, the dropout's key (as f32 bits).
    let mut rs = Shared::<[f32]>::new_slice(comptime!(part_rows * 3));
    let u = UNIT_POS_X as usize;
    let mut i = u;
    while i < len * m {
        let rr = i / m;
        let c = i % m;
        sh[i] = f32::cast_from(a[(r0 + rr) * a.stride(0) + c * a.stride(1)]);
        i += CUBE_DIM_X as usize;
    }
    if comptime![normed || drop] {
        let mut rr = u;
        while rr < len {
            if comptime![normed] {
                rs[rr] = mean[r0 + rr];
                rs[part_rows + rr] = rstd[r0 + rr];
            }
            if comptime![drop] {
                rs[2 * part_rows + rr] = f32::reinterpret(row_key(seed, r0 + rr));
            }
            rr += CUBE_DIM_X as usize;
        }
    }
    sync_cube();
    let col = CUBE_POS_X as usize * CUBE_DIM_X as usize + u;
    if col < nv {
        let mut acc = Array::<Vector<f32, N>>::new(m);
        #[unroll]
        for c in 0..m {
            acc[c] = Vector::new(0.0);
        }
        let mut gv = Vector::<f32, N>::new(1.0);
        let mut bev = Vector::<f32, N>::new(0.0);
        if comptime![normed] {
            gv = Vector::cast_from(gamma[col]);
            bev = Vector::cast_from(beta[col]);
        }
        let bs = b.stride(0) / N::value();
        for rr in 0..len {
            let mut bv = Vector::<f32, N>::cast_from(b[(r0 + rr) * bs + col]);
            if comptime![normed] {
                let v = (bv - Vector::new(rs[rr])) * Vector::new(rs[part_rows + rr]);
                bv = Vector::cast_from(Vector::<F, N>::cast_from(v * gv + bev));
            }
            if comptime![drop] {
                let key = u32::reinterpret(rs[2 * part_rows + rr]);
                bv *= keep_factors::<N>(key, col * N::value(), threshold, inv_keep, SHIFT24);
            }
            #[unroll]
            for c in 0..m {
                acc[c] = fma(Vector::new(sh[rr * m + c]), bv, acc[c]);
            }
        }
        let base = CUBE_POS_Y as usize * m * nv + col;
        #[unroll]
        for c in 0..m {
            out[base + c * nv] = acc[c];
        }
    }
}

/// A LayerNorm's input-side statistics and affine parameters, for [`launch_thin_tn`]: the per-row
/// mean and rstd `[rows, 1]` (f32), gamma and beta `[n]`.
struct Norm {
    mean: CubeTensor,
    rstd: CubeTensor,
    gamma: CubeTensor,
    beta: CubeTensor,
}

/// `aᵀ·b` with [`thin_tn_kernel`]: a `[rows, m]` (m ≤ [`THIN_MAX`]), b `[rows, n]` -> `[m, n]` in b's
/// dtype, summed in f32 (the parts' sums one reduction more); b normalized first with `norm`,
/// then dropped with `(seed, keep)` where `keep < 1`.
fn launch_thin_tn(
    a: CubeTensor,
    b: CubeTensor,
    norm: Option<Norm>,
    seed: CubeTensor,
    keep: f64,
) -> CubeTensor {
    let dtype = b.dtype;
    let a = match a.dtype == dtype {
        true => a,
        false => CubeBackend::float_cast(a, dtype.into()),
    };
    let b = match b.meta.strides()[1] == 1 {
        true => b,
        false => into_contiguous(b),
    };
    let [rows, m] = a.meta.shape.dims::<2>();
    let n = b.meta.shape[1];
    assert!(
        m <= THIN_MAX && b.meta.shape[0] == rows,
        "thin_tn: a {:?}, b {:?}",
        a.meta.shape,
        b.meta.shape
    );
    if rows == 0 {
        return CubeBackend::float_zeros(Shape::new([m, n]), &b.device, dtype.into());
    }
    let (seed, threshold, inv_keep, drop) = drop_args(seed, keep);
    let normed = norm.is_some();
    // Without a norm, stand-ins never read: the seed for the statistics, b for gamma and beta.
    let (mean, rstd, gamma, beta) = match norm {
        Some(nm) => {
            let gamma = into_contiguous(nm.gamma);
            let beta = into_contiguous(CubeBackend::float_cast(nm.beta, gamma.dtype.into()));
            (
                into_contiguous(nm.mean),
                into_contiguous(nm.rstd),
                gamma,
                beta,
            )
        }
        None => (seed.clone(), seed.clone(), b.clone(), b.clone()),
    };
    // Vectors of f32 sums: 4 at most.
    let v = vector_width_at(&[n, b.meta.strides()[0]], 4, 4, &[&b, &gamma, &beta]);
    // The normed product's per-element work (the norm, the hash) makes a unit's walk down its
    // rows the bottleneck where n is narrow (768 columns: 192 cubes of 64 units at 128 rows a
    // part): parts of 32 rows there.
    let part_rows = match normed {
        true => THIN_ROWS / 4,
        false => THIN_ROWS,
    };
    let parts = rows.div_ceil(part_rows);
    let (client, device) = (b.client.clone(), b.device.clone());
    let out = empty_device_dtype(
        client.clone(),
        device,
        Shape::new([parts, m, n]),
        DType::F32,
    );
    let dtypes = [
        dtype_to_storage_type(dtype),
        dtype_to_storage_type(gamma.dtype),
    ];
    // Safety: a's rows `< rows` and columns `< m`, b's rows `< rows` and vectors `< n / v` (gamma
    // and beta `[n]`, mean and rstd `[rows, 1]`, read only `normed`), out `[parts, m, n]` written
    // at part `y < parts`.
    unsafe {
        thin_tn_kernel::launch_unchecked(
            &client,
            CubeCount::Static((n / v).div_ceil(THIN_UNITS) as u32, parts as u32, 1),
            CubeDim::new_1d(THIN_UNITS as u32),
            v,
            a.into_tensor_arg(),
            b.into_tensor_arg(),
            mean.into_tensor_arg(),
            rstd.into_tensor_arg(),
            gamma.into_tensor_arg(),
            beta.into_tensor_arg(),
            seed.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            threshold,
            inv_keep,
            m,
            part_rows,
            normed,
            drop,
            dtypes,
        );
    }
    let sum = CubeBackend::float_sum_dim(out, 0);
    let sum = CubeBackend::float_reshape(sum, Shape::new([m, n]));
    match dtype {
        DType::F32 => sum,
        _ => CubeBackend::float_cast(sum, dtype.into()),
    }
}

/// `[rows, cols]` in `like`'s dtype.
fn spec(rows: usize, cols: usize, like: &TensorSpec) -> TensorSpec {
    TensorSpec::new(Shape::new([rows, cols]), like.dtype)
}

/// The fused LoRA linear's kernels on cubecl (2-D operands; `seed` `[2]` f32 uniforms, read only
/// where `keep < 1`).
#[backend_extension(Cube, Fusion)]
pub trait AdapterKernels: Backend {
    /// x `[rows, k]`, a `[r, k]` -> `scale · (x·m)·aᵀ` `[rows, r]`, m hashed dropout.
    #[fusion(meta = |x, a, _seed, _scale, _keep| spec(x.shape[0], a.shape[0], x))]
    fn lora_down(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
    ) -> FloatTensor<Self>;

    /// [`lora_down`](Self::lora_down) and the dropped input `x·m` `[rows, k]`.
    #[fusion(meta = |x, a, _seed, _scale, _keep| (spec(x.shape[0], a.shape[0], x), x.clone()))]
    fn lora_down_dropped(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        scale: f64,
        keep: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// base `[rows, n]`, bias `[n]` (read only `with_bias`), xa `[rows, r]`, bt `[r, n]` ->
    /// `base + bias + (xa·bt)·m`, m hashed dropout.
    #[fusion(meta = |base, _bias, _xa, _bt, _seed, _keep, _with_bias| base.clone())]
    fn lora_up(
        base: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        xa: FloatTensor<Self>,
        bt: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        keep: f64,
        with_bias: bool,
    ) -> FloatTensor<Self>;

    /// `aᵀ·b`: a `[rows, m]` (m ≤ [`THIN_MAX`]), b `[rows, n]` -> `[m, n]` in b's dtype, summed in
    /// f32 (LoRA's `[r, n]` weight gradients).
    #[fusion(meta = |a, b| spec(a.shape[1], b.shape[1], b))]
    fn thin_tn(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `aᵀ·drop(ln(x))`: a `[rows, m]` (m ≤ [`THIN_MAX`]), LayerNorm's input x `[rows, n]`, its
    /// mean and rstd `[rows, 1]` (f32), gamma and beta `[n]`; `ln(x) = (x − mean)·rstd·gamma +
    /// beta` in x's dtype, `drop` hashed dropout where `keep < 1` -> `[m, n]` in x's dtype, one
    /// pass over x.
    #[fusion(meta = |a, x, _mean, _rstd, _gamma, _beta, _seed, _keep| spec(a.shape[1], x.shape[1], x))]
    #[allow(clippy::too_many_arguments)]
    fn thin_tn_normed(
        a: FloatTensor<Self>,
        x: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        seed: FloatTensor<Self>,
        keep: f64,
    ) -> FloatTensor<Self>;
}

impl AdapterKernels for CubeBackend {
    fn lora_down(
        x: CubeTensor,
        a: CubeTensor,
        seed: CubeTensor,
        scale: f64,
        keep: f64,
    ) -> CubeTensor {
        launch_down(x, a, seed, scale, keep, false).0
    }

    fn lora_down_dropped(
        x: CubeTensor,
        a: CubeTensor,
        seed: CubeTensor,
        scale: f64,
        keep: f64,
    ) -> (CubeTensor, CubeTensor) {
        let (xa, xd) = launch_down(x, a, seed, scale, keep, true);
        (xa, xd.expect("asked for"))
    }

    fn lora_up(
        base: CubeTensor,
        bias: CubeTensor,
        xa: CubeTensor,
        bt: CubeTensor,
        seed: CubeTensor,
        keep: f64,
        with_bias: bool,
    ) -> CubeTensor {
        launch_up(base, with_bias.then_some(bias), xa, bt, seed, keep)
    }

    fn thin_tn(a: CubeTensor, b: CubeTensor) -> CubeTensor {
        let seed = b.clone();
        launch_thin_tn(a, b, None, seed, 1.0)
    }

    fn thin_tn_normed(
        a: CubeTensor,
        x: CubeTensor,
        mean: CubeTensor,
        rstd: CubeTensor,
        gamma: CubeTensor,
        beta: CubeTensor,
        seed: CubeTensor,
        keep: f64,
    ) -> CubeTensor {
        let norm = Norm {
            mean,
            rstd,
            gamma,
            beta,
        };
        launch_thin_tn(a, x, Some(norm), seed, keep)
    }
}
