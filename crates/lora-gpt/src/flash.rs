//! Causal attention's forward pass on cubecl as one kernel (FlashAttention's online softmax).
//!
//! The materialised form writes each block of scores `[.., 256, keys]`, runs the softmax kernel
//! over it and multiplies the probabilities by v: three passes over the scores a block, ~11 ms of
//! GPT-2 small's f32 step at 8 × 1024 on an H100. [`flash_forward_kernel`] keeps a cube's scores
//! in registers and shared memory: a cube of 256 units takes 64 queries of one head, walks the
//! keys up to the diagonal 64 at a time, keeps each row's running max and sum, and writes the
//! output and the log-sum-exp the backward pass recomputes the probabilities from. Hashed dropout
//! is drawn as the softmax kernels draw it ([`crate::kernels`]), so the backward pass is unchanged.

use crate::kernels::SHIFT32;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, empty_device_dtype};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use lora_core::kernels::{keep_factors, lane_column, row_key, vector_width_at};

/// Queries and keys of a tile, and the head size the kernel takes.
const BR: usize = 64;
pub(crate) const HEAD: usize = 64;
const UNITS: usize = 256;
/// Elements of a vector: a row of 64 is 16 of them.
const LANES: usize = 4;
const ROW_VECS: usize = HEAD / LANES;
/// A masked score: finite, so that `exp(MASKED − max)` is 0 and never NaN.
const MASKED: f32 = -3.0e38;
/// Shared memory of a cube: two tiles of 64 × 64 f32.
const SHARED_BYTES: usize = 2 * BR * HEAD * 4;

/// The unit's 4 × 4 block of a tile: its first row (of 4) and its vector along the row. The
/// transposed tiles take the rows along the units, so that the shared stores do not conflict.
#[cube]
fn block_of(#[comptime] transpose: bool) -> (usize, usize) {
    let u = UNIT_POS_X as usize;
    let mut rb = u / 16;
    let mut db = u % 16;
    if comptime![transpose] {
        rb = u % 16;
        db = u / 16;
    }
    (rb * LANES, db)
}

/// The unit's block ([`block_of`]) of rows `r0 .. r0 + 64` of a head (rows past `len` re-read the
/// last one) from `x` (vector `base`, rows `rs` vectors apart) into `regs`, as f32: issued here,
/// waited for where [`store_tile`] uses them.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_tile<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    base: usize,
    rs: usize,
    r0: usize,
    len: usize,
    regs: &mut Array<Vector<f32, N>>,
    #[comptime] transpose: bool,
) {
    let (r, db) = block_of(transpose);
    #[unroll]
    for j in 0..LANES {
        let row = (r0 + r + j).min(len - 1);
        regs[j] = Vector::<f32, N>::cast_from(x[base + row * rs + db]);
    }
}

/// The block of [`fetch_tile`] into shared memory times `scale`: as it is (`sh[row·16 + v]`,
/// vector v of the row) or transposed (`sh[c·16 + row / 4]`, rows `4·(row / 4) ..` of column c).
#[cube]
fn store_tile<N: Size>(
    regs: &Array<Vector<f32, N>>,
    sh: &mut Shared<[Vector<f32, N>]>,
    scale: f32,
    #[comptime] transpose: bool,
) {
    let (r, db) = block_of(transpose);
    #[unroll]
    for j in 0..LANES {
        if comptime![transpose] {
            sh[(db * LANES + j) * ROW_VECS + r / LANES] =
                lane_column::<N>(regs, j) * Vector::new(scale);
        } else {
            sh[(r + j) * ROW_VECS + db] = regs[j] * Vector::new(scale);
        }
    }
}

/// `acc[i] += Σ_c a[4·ty + i, c] · b[c, 4·tx ..]` for the 64 × 64 tiles a (`a[row·16 + c / 4]`)
/// and b (`b[c·16 + col / 4]`) in shared memory: `q·kᵀ` (kᵀ stored transposed) and `p·v`. `rows`:
/// scratch registers.
#[cube]
fn tile_product<N: Size>(
    a: &Shared<[Vector<f32, N>]>,
    b: &Shared<[Vector<f32, N>]>,
    rows: &mut Array<Vector<f32, N>>,
    acc: &mut Array<Vector<f32, N>>,
    ty: usize,
    tx: usize,
) {
    #[unroll]
    for cv in 0..ROW_VECS {
        #[unroll]
        for i in 0..LANES {
            rows[i] = a[(ty * LANES + i) * ROW_VECS + cv];
        }
        #[unroll]
        for e in 0..LANES {
            let bv = b[(cv * LANES + e) * ROW_VECS + tx];
            #[unroll]
            for i in 0..LANES {
                acc[i] = fma(Vector::new(rows[i].extract(e)), bv, acc[i]);
            }
        }
    }
}

/// Causal attention of one head's 64 queries: `o = (softmax(q·kᵀ·scale + causal)·m)·v` and
/// `lse = max + ln Σ exp(x − max)` per query (x the masked, scaled scores), m hashed dropout's
/// `{0, 1/keep}` factor (`drop`) drawn from the score's row among all `[seq, seq]` score rows of
/// the heads (`head·seq + query`) and its key, as the softmax kernels draw it.
///
/// q, k, v `[batch, head, seq, 64]` (any strides, rows contiguous), read `N` = 4 elements at a
/// time; o `[batch, seq, head, 64]` contiguous; lse `[batch, head, seq, 1]` (f32). Cube
/// `(x, y)`: query block `blocks − 1 − x` (the longest first) of head `y`. Unit `(ty, tx) =
/// (u / 16, u % 16)` holds the scores of queries `4·ty ..` and keys `4·tx ..` of each key block,
/// and the output of those queries at columns `4·tx ..`. Shared memory: q (as is), then the
/// probabilities; kᵀ, then the row maxima, then v.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn flash_forward_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    seed: &Tensor<f32>,
    o: &mut Tensor<Vector<F, N>>,
    lse: &mut Tensor<f32>,
    scale: f32,
    threshold: u32,
    inv_keep: f32,
    blocks: usize,
    #[comptime] drop: bool,
    #[define(F)] _dtype: ElemType,
) {
    let heads = q.shape(1);
    let t = q.shape(2);
    let bh = CUBE_POS_Y as usize;
    let (bi, hi) = (bh / heads, bh % heads);
    let qb = blocks - 1 - CUBE_POS_X as usize;
    let q0 = qb * BR;
    let u = UNIT_POS_X as usize;
    let (ty, tx) = (u / 16, u % 16);
    let q_base = (bi * q.stride(0) + hi * q.stride(1)) / LANES;
    let k_base = (bi * k.stride(0) + hi * k.stride(1)) / LANES;
    let v_base = (bi * v.stride(0) + hi * v.stride(1)) / LANES;
    let (qs, ks, vs) = (
        q.stride(2) / LANES,
        k.stride(2) / LANES,
        v.stride(2) / LANES,
    );

    let mut sx = Shared::<[Vector<f32, N>]>::new_slice(comptime!(BR * ROW_VECS));
    let mut sy = Shared::<[Vector<f32, N>]>::new_slice(comptime!(BR * ROW_VECS));

    // Per query row i of this unit: the running max, this unit's part of the sum (its keys), the
    // output's columns `4·tx ..`, hashed dropout's row key.
    let mut m = Vector::<f32, N>::new(MASKED);
    let mut l = Vector::<f32, N>::new(0.0);
    let mut acc = Array::<Vector<f32, N>>::new(LANES);
    let mut keys = Array::<u32>::new(LANES);
    #[unroll]
    for i in 0..LANES {
        acc[i] = Vector::new(0.0);
        if comptime![drop] {
            keys[i] = row_key(seed, bh * t + q0 + ty * LANES + i);
        }
    }
    let mut s = Array::<Vector<f32, N>>::new(LANES);
    let mut rows = Array::<Vector<f32, N>>::new(LANES);
    // The unit's blocks of q (the same for every key block), of the next k and of v: each global
    // load is issued a phase before its shared store, so that its latency overlaps the products.
    let mut qr = Array::<Vector<f32, N>>::new(LANES);
    let mut kr = Array::<Vector<f32, N>>::new(LANES);
    let mut vr = Array::<Vector<f32, N>>::new(LANES);
    fetch_tile::<F, N>(q, q_base, qs, q0, t, &mut qr, false);
    fetch_tile::<F, N>(k, k_base, ks, 0, t, &mut kr, true);
    for kb in 0..qb + 1 {
        let k0 = kb * BR;
        store_tile::<N>(&qr, &mut sx, scale, false);
        store_tile::<N>(&kr, &mut sy, 1.0, true);
        sync_cube();
        fetch_tile::<F, N>(v, v_base, vs, k0, t, &mut vr, false);
        // Scores: s[i] lane j = q[4·ty + i] · k[4·tx + j].
        #[unroll]
        for i in 0..LANES {
            s[i] = Vector::new(0.0);
        }
        tile_product::<N>(&sx, &sy, &mut rows, &mut s, ty, tx);
        // The causal mask (and keys past the sequence); this unit's row maxima.
        let mut part = Vector::<f32, N>::new(MASKED);
        #[unroll]
        for i in 0..LANES {
            let row = q0 + ty * LANES + i;
            let mut x = s[i];
            let mut mx = f32::new(MASKED);
            #[unroll]
            for j in 0..LANES {
                let col = k0 + tx * LANES + j;
                let xj = select(col <= row && col < t, x.extract(j), f32::new(MASKED));
                x.insert(j, xj);
                mx = f32::max(mx, xj);
            }
            s[i] = x;
            part.insert(i, mx);
        }
        sync_cube();
        sy[u] = part;
        sync_cube();
        let mut mb = m;
        #[unroll]
        for x in 0..16 {
            let p = sy[ty * 16 + x];
            #[unroll]
            for i in 0..LANES {
                mb.insert(i, f32::max(mb.extract(i), p.extract(i)));
            }
        }
        let alpha = (m - mb).exp();
        m = mb;
        l *= alpha;
        // The probabilities (unnormalised), dropped, into shared memory as `[query, key]`.
        #[unroll]
        for i in 0..LANES {
            let p = (s[i] - Vector::new(m.extract(i))).exp();
            let mut sum = f32::new(0.0);
            #[unroll]
            for j in 0..LANES {
                sum += p.extract(j);
            }
            l.insert(i, l.extract(i) + sum);
            acc[i] *= Vector::new(alpha.extract(i));
            let mut pd = p;
            if comptime![drop] {
                pd *= keep_factors::<N>(keys[i], k0 + tx * LANES, threshold, inv_keep, SHIFT32);
            }
            sx[(ty * LANES + i) * ROW_VECS + tx] = pd;
        }
        sync_cube();
        store_tile::<N>(&vr, &mut sy, 1.0, false);
        sync_cube();
        if kb < qb {
            fetch_tile::<F, N>(k, k_base, ks, k0 + BR, t, &mut kr, true);
        }
        // acc[i] += Σ_key p[4·ty + i, key] · v[key, 4·tx ..].
        tile_product::<N>(&sx, &sy, &mut rows, &mut acc, ty, tx);
        sync_cube();
    }
    // The rows' sums over all 16 units of a row.
    sy[u] = l;
    sync_cube();
    let mut sum = Vector::<f32, N>::new(0.0);
    #[unroll]
    for x in 0..16 {
        sum += sy[ty * 16 + x];
    }
    #[unroll]
    for i in 0..LANES {
        let row = q0 + ty * LANES + i;
        if row < t {
            let li = sum.extract(i);
            let out = acc[i] * Vector::new(1.0 / li);
            o[((bi * t + row) * heads + hi) * ROW_VECS + tx] = Vector::cast_from(out);
            if tx == 0 {
                lse[bh * t + row] = m.extract(i) + li.ln();
            }
        }
    }
}

/// Whether [`flash_forward`] takes heads of size `d` in `dtype`.
pub(crate) fn flash_takes(d: usize, dtype: DType) -> bool {
    d == HEAD && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Cubes along y at most.
const MAX_GRID: usize = 65_535;

/// Causal attention of q, k, v `[batch, head, seq, d]` (one dtype) with hashed dropout `drop`
/// (the seed `[2]`, f32 uniforms, and keep) -> the output `[batch, seq, head, d]` (contiguous,
/// q's dtype) and the log-sum-exp `[batch, head, seq, 1]` (f32); `None` where the kernel does not
/// take the heads ([`flash_takes`]), the device lacks the shared memory or the grid is too large.
pub(crate) fn flash_forward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    drop: Option<(CubeTensor, f64)>,
    scale: f64,
) -> Option<(CubeTensor, CubeTensor)> {
    let [b, h, t, d] = q.meta.shape.dims::<4>();
    assert!(
        k.dtype == q.dtype && v.dtype == q.dtype,
        "flash attention: q, k, v in one dtype"
    );
    let props = q.client.properties();
    if !flash_takes(d, q.dtype)
        || SHARED_BYTES > props.hardware.max_shared_memory_size
        || (UNITS as u32) > props.hardware.max_units_per_cube
        || b * h > MAX_GRID
        || t == 0
    {
        return None;
    }
    // Rows read as vectors of 4: contiguous rows, strides and start offsets multiples of 4.
    let fit = |x: CubeTensor| {
        let s = x.meta.strides();
        let lens = [s[0], s[1], s[2]];
        match s[3] == 1 && vector_width_at(&lens, x.dtype.size(), LANES, &[&x]) == LANES {
            true => x,
            false => into_contiguous(x),
        }
    };
    let (q, k, v) = (fit(q), fit(k), fit(v));
    let drop = crate::kernels::DropArgs::new(drop, &q);
    let (client, device) = (q.client.clone(), q.device.clone());
    let o = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([b, t, h, d]),
        q.dtype,
    );
    let lse = empty_device_dtype(client.clone(), device, Shape::new([b, h, t, 1]), DType::F32);
    let dtype = dtype_to_storage_type(q.dtype);
    // Safety: rows are clamped into `..t` for the loads, stores check `row < t`; vector offsets
    // are multiples of 4 elements (checked above), every head `< b·h`.
    unsafe {
        flash_forward_kernel::launch_unchecked(
            &client,
            CubeCount::Static(t.div_ceil(BR) as u32, (b * h) as u32, 1),
            CubeDim::new_1d(UNITS as u32),
            LANES,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            drop.seed.into_tensor_arg(),
            o.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            scale as f32,
            drop.threshold,
            drop.inv_keep,
            t.div_ceil(BR),
            drop.drop,
            dtype,
        );
    }
    Some((o, lse))
}

/// The same attention without the kernel (Burn's matmuls and the softmax row kernel), where
/// [`flash_forward`] does not apply: the output as `[batch, seq, head, d]`.
pub(crate) fn materialised(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    bias: CubeTensor,
    drop: Option<(CubeTensor, f64)>,
    scale: f64,
) -> (CubeTensor, CubeTensor) {
    let s = CubeBackend::float_matmul(q, CubeBackend::float_swap_dims(k, 2, 3));
    let (p, lse) = crate::kernels::launch_softmax_lse(s, bias, 0, drop, scale);
    let o = CubeBackend::float_matmul(p, v);
    (into_contiguous(CubeBackend::float_swap_dims(o, 1, 2)), lse)
}
