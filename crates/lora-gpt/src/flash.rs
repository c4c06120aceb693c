//! Causal attention on cubecl as kernels of its own (FlashAttention's online softmax forward,
//! FlashAttention-2's backward).
//!
//! The materialised form writes each block of scores `[.., 256, keys]`, runs the softmax kernel
//! over it and multiplies the probabilities by v: three passes over the scores a block, ~11 ms of
//! GPT-2 small's f32 step at 8 × 1024 on an H100. [`flash_forward_kernel`] keeps a cube's scores
//! in registers and shared memory: a cube of 256 units takes 64 queries of one head, walks the
//! keys up to the diagonal 64 at a time, keeps each row's running max and sum, and writes the
//! output and the log-sum-exp the backward pass recomputes the probabilities from. Hashed dropout
//! is drawn as the softmax kernels draw it ([`crate::kernels`]), so either backward pass fits it.
//! [`flash_backward`] (f32): [`flash_backward_kv_kernel`] walks the queries of 64 keys, keeping
//! their gradients in registers, and stores the softmax gradient per tile, which
//! [`flash_backward_q_kernel`] multiplies by k (2.35 -> 1.94 ms a layer of GPT-2 small at 8 × 1024
//! on an H100).

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

/// Head `(bi, hi)` of x `[batch, head, seq, d]`: its first vector and its rows' stride in vectors.
#[cube]
fn head_of<F: Float, N: Size>(x: &Tensor<Vector<F, N>>, bi: usize, hi: usize) -> (usize, usize) {
    (
        (bi * x.stride(0) + hi * x.stride(1)) / LANES,
        x.stride(2) / LANES,
    )
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

/// `acc[i] += Σ_c a[c, 4·ty + i] · b[c, 4·tx ..]` for the 64 × 64 tiles a and b in shared
/// memory, both stored as they are (`x[c·16 + col / 4]`): `aᵀ·b`, the key gradients `pᵀ·dy` and
/// `dsᵀ·q` of the backward pass.
#[cube]
fn tile_product_tn<N: Size>(
    a: &Shared<[Vector<f32, N>]>,
    b: &Shared<[Vector<f32, N>]>,
    acc: &mut Array<Vector<f32, N>>,
    ty: usize,
    tx: usize,
) {
    #[unroll]
    for c in 0..BR {
        let av = a[c * ROW_VECS + ty];
        let bv = b[c * ROW_VECS + tx];
        #[unroll]
        for i in 0..LANES {
            acc[i] = fma(Vector::new(av.extract(i)), bv, acc[i]);
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
    let (q_base, qs) = head_of::<F, N>(q, bi, hi);
    let (k_base, ks) = head_of::<F, N>(k, bi, hi);
    let (v_base, vs) = head_of::<F, N>(v, bi, hi);

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

/// `dots[row] = Σ_d dy[row, d]·o[row, d]` for each of the `rows = batch·head·seq` rows of dy and
/// o `[batch, head, seq, 64]` (any strides, rows contiguous): the softmax backward's
/// `Σ_key p·dp` of each query (FlashAttention's `D`), in f32.
#[cube(launch_unchecked)]
fn row_dots_kernel<F: Float, N: Size>(
    dy: &Tensor<Vector<F, N>>,
    o: &Tensor<Vector<F, N>>,
    dots: &mut Tensor<f32>,
    rows: usize,
    #[define(F)] _dtype: ElemType,
) {
    let r = ABSOLUTE_POS;
    if r >= rows {
        terminate!();
    }
    let (heads, t) = (dy.shape(1), dy.shape(2));
    let (bh, row) = (r / t, r % t);
    let (bi, hi) = (bh / heads, bh % heads);
    let (yb, ys) = head_of::<F, N>(dy, bi, hi);
    let (ob, os) = head_of::<F, N>(o, bi, hi);
    let (yb, ob) = (yb + row * ys, ob + row * os);
    let mut acc = Vector::<f32, N>::new(0.0);
    #[unroll]
    for c in 0..ROW_VECS {
        acc += Vector::<f32, N>::cast_from(dy[yb + c]) * Vector::<f32, N>::cast_from(o[ob + c]);
    }
    let mut sum = f32::new(0.0);
    #[unroll]
    for e in 0..LANES {
        sum += acc.extract(e);
    }
    dots[r] = sum;
}

/// Causal attention's backward pass for one head's 64 keys (FlashAttention-2's outer loop over
/// keys): the gradients of k and v, and the softmax backward `ds` that [`flash_backward_q_kernel`]
/// turns into q's gradient (WGSL has no float atomics to sum it here).
///
/// For each query block from the diagonal on: the scores again (`s = q·scale·kᵀ`), `p = exp(s −
/// lse)` (0 above the diagonal and past the sequence), the dropped `pd = p·m` (hashed dropout, as
/// the forward kernel draws it), `dp = dy·vᵀ`, `ds = p·(dp·m − dots)`; then `dv += pdᵀ·dy`, `dk +=
/// dsᵀ·q·scale`, and ds stored as tile `(query block, key block)` of the head's lower triangle.
/// q, k, v, dy `[batch, head, seq, 64]` (any strides, rows contiguous); lse, dots `[batch, head,
/// seq, 1]` (f32); ds `[batch·head, blocks·(blocks + 1)/2, 64, 64]` (f32); dqkv `[batch, seq,
/// 3·head·64]` (k's and v's columns written). Cube `(x, y)`: key block x (the longest first) of
/// head y; unit `(ty, tx)` holds queries (and then keys) `4·ty ..` and keys (and then columns)
/// `4·tx ..`. Shared memory: q, then dy, then q; kᵀ, then vᵀ, then pd, then ds.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn flash_backward_kv_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    dy: &Tensor<Vector<F, N>>,
    lse: &Tensor<f32>,
    dots: &Tensor<f32>,
    seed: &Tensor<f32>,
    ds: &mut Tensor<Vector<f32, N>>,
    dqkv: &mut Tensor<Vector<F, N>>,
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
    let kb = CUBE_POS_X as usize;
    let k0 = kb * BR;
    let u = UNIT_POS_X as usize;
    let (ty, tx) = (u / 16, u % 16);
    let (q_base, qs) = head_of::<F, N>(q, bi, hi);
    let (k_base, ks) = head_of::<F, N>(k, bi, hi);
    let (v_base, vs) = head_of::<F, N>(v, bi, hi);
    let (y_base, ys) = head_of::<F, N>(dy, bi, hi);
    let tiles = bh * (blocks * (blocks + 1) / 2);

    let mut sx = Shared::<[Vector<f32, N>]>::new_slice(comptime!(BR * ROW_VECS));
    let mut sy = Shared::<[Vector<f32, N>]>::new_slice(comptime!(BR * ROW_VECS));

    let mut dk = Array::<Vector<f32, N>>::new(LANES);
    let mut dv = Array::<Vector<f32, N>>::new(LANES);
    let mut s = Array::<Vector<f32, N>>::new(LANES);
    let mut dp = Array::<Vector<f32, N>>::new(LANES);
    let mut rows = Array::<Vector<f32, N>>::new(LANES);
    #[unroll]
    for i in 0..LANES {
        dk[i] = Vector::new(0.0);
        dv[i] = Vector::new(0.0);
    }
    // Global loads issued a phase before their shared stores: ra takes q, dy, q; rb k, v.
    let mut ra = Array::<Vector<f32, N>>::new(LANES);
    let mut rb = Array::<Vector<f32, N>>::new(LANES);
    fetch_tile::<F, N>(q, q_base, qs, k0, t, &mut ra, false);
    fetch_tile::<F, N>(k, k_base, ks, k0, t, &mut rb, true);
    for qb in kb..blocks {
        let q0 = qb * BR;
        store_tile::<N>(&ra, &mut sx, scale, false);
        store_tile::<N>(&rb, &mut sy, 1.0, true);
        sync_cube();
        fetch_tile::<F, N>(dy, y_base, ys, q0, t, &mut ra, false);
        fetch_tile::<F, N>(v, v_base, vs, k0, t, &mut rb, true);
        #[unroll]
        for i in 0..LANES {
            s[i] = Vector::new(0.0);
            dp[i] = Vector::new(0.0);
        }
        // s[i] lane j = q[4·ty + i]·scale · k[4·tx + j].
        tile_product::<N>(&sx, &sy, &mut rows, &mut s, ty, tx);
        sync_cube();
        store_tile::<N>(&ra, &mut sx, 1.0, false);
        store_tile::<N>(&rb, &mut sy, 1.0, true);
        sync_cube();
        fetch_tile::<F, N>(q, q_base, qs, q0, t, &mut ra, false);
        // dp[i] lane j = dy[4·ty + i] · v[4·tx + j].
        tile_product::<N>(&sx, &sy, &mut rows, &mut dp, ty, tx);
        let tile = (tiles + qb * (qb + 1) / 2 + kb) * BR;
        #[unroll]
        for i in 0..LANES {
            let row = q0 + ty * LANES + i;
            let at = bh * t + row.min(t - 1);
            let mut p = (s[i] - Vector::new(lse[at])).exp();
            #[unroll]
            for j in 0..LANES {
                let col = k0 + tx * LANES + j;
                p.insert(
                    j,
                    select(col <= row && row < t, p.extract(j), f32::new(0.0)),
                );
            }
            let mut pd = p;
            let mut g = dp[i];
            if comptime![drop] {
                let m = keep_factors::<N>(
                    row_key(seed, bh * t + row),
                    k0 + tx * LANES,
                    threshold,
                    inv_keep,
                    SHIFT32,
                );
                pd *= m;
                g *= m;
            }
            s[i] = pd;
            dp[i] = p * (g - Vector::new(dots[at]));
            ds[(tile + ty * LANES + i) * ROW_VECS + tx] = dp[i];
        }
        sync_cube();
        #[unroll]
        for i in 0..LANES {
            sy[(ty * LANES + i) * ROW_VECS + tx] = s[i];
        }
        sync_cube();
        // dv[i] += Σ_query pd[query, 4·ty + i] · dy[query, 4·tx ..].
        tile_product_tn::<N>(&sy, &sx, &mut dv, ty, tx);
        sync_cube();
        #[unroll]
        for i in 0..LANES {
            sy[(ty * LANES + i) * ROW_VECS + tx] = dp[i];
        }
        store_tile::<N>(&ra, &mut sx, scale, false);
        sync_cube();
        if qb + 1 < blocks {
            fetch_tile::<F, N>(q, q_base, qs, q0 + BR, t, &mut ra, false);
            fetch_tile::<F, N>(k, k_base, ks, k0, t, &mut rb, true);
        }
        // dk[i] += Σ_query ds[query, 4·ty + i] · q[query, 4·tx ..]·scale.
        tile_product_tn::<N>(&sy, &sx, &mut dk, ty, tx);
        sync_cube();
    }
    #[unroll]
    for i in 0..LANES {
        let row = k0 + ty * LANES + i;
        if row < t {
            let at = ((bi * t + row) * 3 * heads + heads + hi) * ROW_VECS + tx;
            dqkv[at] = Vector::cast_from(dk[i]);
            dqkv[at + heads * ROW_VECS] = Vector::cast_from(dv[i]);
        }
    }
}

/// q's gradient from [`flash_backward_kv_kernel`]'s ds: `dq = Σ_key ds·k·scale` over the key blocks
/// up to the diagonal. k `[batch, head, seq, 64]`, ds as there, dqkv `[batch, seq, 3·head·64]`
/// (q's columns written). Cube `(x, y)`: query block `blocks − 1 − x` (the longest first) of head
/// y; unit `(ty, tx)` queries `4·ty ..`, columns `4·tx ..`.
#[cube(launch_unchecked)]
fn flash_backward_q_kernel<F: Float, N: Size>(
    k: &Tensor<Vector<F, N>>,
    ds: &Tensor<Vector<f32, N>>,
    dqkv: &mut Tensor<Vector<F, N>>,
    scale: f32,
    blocks: usize,
    #[define(F)] _dtype: ElemType,
) {
    let heads = k.shape(1);
    let t = k.shape(2);
    let bh = CUBE_POS_Y as usize;
    let (bi, hi) = (bh / heads, bh % heads);
    let qb = blocks - 1 - CUBE_POS_X as usize;
    let q0 = qb * BR;
    let u = UNIT_POS_X as usize;
    let (ty, tx) = (u / 16, u % 16);
    let (k_base, ks) = head_of::<F, N>(k, bi, hi);
    let tiles = (bh * (blocks * (blocks + 1) / 2) + qb * (qb + 1) / 2) * BR * ROW_VECS;

    let mut sx = Shared::<[Vector<f32, N>]>::new_slice(comptime!(BR * ROW_VECS));
    let mut sy = Shared::<[Vector<f32, N>]>::new_slice(comptime!(BR * ROW_VECS));
    let mut acc = Array::<Vector<f32, N>>::new(LANES);
    let mut rows = Array::<Vector<f32, N>>::new(LANES);
    #[unroll]
    for i in 0..LANES {
        acc[i] = Vector::new(0.0);
    }
    let mut ra = Array::<Vector<f32, N>>::new(LANES);
    let mut rb = Array::<Vector<f32, N>>::new(LANES);
    let tile = comptime!(BR * ROW_VECS);
    fetch_tile::<f32, N>(ds, tiles, ROW_VECS, 0, BR, &mut ra, false);
    fetch_tile::<F, N>(k, k_base, ks, 0, t, &mut rb, false);
    for kb in 0..qb + 1 {
        store_tile::<N>(&ra, &mut sx, 1.0, false);
        store_tile::<N>(&rb, &mut sy, 1.0, false);
        sync_cube();
        if kb < qb {
            fetch_tile::<f32, N>(ds, tiles + (kb + 1) * tile, ROW_VECS, 0, BR, &mut ra, false);
            fetch_tile::<F, N>(k, k_base, ks, (kb + 1) * BR, t, &mut rb, false);
        }
        // acc[i] += Σ_key ds[4·ty + i, key] · k[key, 4·tx ..].
        tile_product::<N>(&sx, &sy, &mut rows, &mut acc, ty, tx);
        sync_cube();
    }
    #[unroll]
    for i in 0..LANES {
        let row = q0 + ty * LANES + i;
        if row < t {
            let at = ((bi * t + row) * 3 * heads + hi) * ROW_VECS + tx;
            dqkv[at] = Vector::cast_from(acc[i] * Vector::new(scale));
        }
    }
}

/// Whether [`flash_forward`] takes heads of size `d` in `dtype`.
pub(crate) fn flash_takes(d: usize, dtype: DType) -> bool {
    d == HEAD && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Whether the one-pass backward runs for heads of `d` in `dtype`: f32 ([`flash_backward`]) and
/// f16 (`flash_cm`'s kernels where the device has workgroup-scope matrices, else these f32
/// kernels).
pub(crate) fn flash_backward_takes(d: usize, dtype: DType) -> bool {
    d == HEAD && matches!(dtype, DType::F32 | DType::F16)
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
    let [b, h, t, _] = q.meta.shape.dims::<4>();
    assert!(
        k.dtype == q.dtype && v.dtype == q.dtype,
        "flash attention: q, k, v in one dtype"
    );
    if !kernels_fit(&q) {
        return None;
    }
    let [q, k, v] = [q, k, v].map(vector_rows);
    let drop = crate::kernels::DropArgs::new(drop, &q);
    let client = q.client.clone();
    let (o, lse) = forward_outputs(&q);
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

/// The outputs of a forward kernel for q `[batch, head, seq, d]`: o `[batch, seq, head, d]`
/// (contiguous, q's dtype) and the log-sum-exp `[batch, head, seq, 1]` (f32).
pub(crate) fn forward_outputs(q: &CubeTensor) -> (CubeTensor, CubeTensor) {
    let [b, h, t, d] = q.meta.shape.dims::<4>();
    let (client, device) = (q.client.clone(), q.device.clone());
    let o = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([b, t, h, d]),
        q.dtype,
    );
    let lse = empty_device_dtype(client, device, Shape::new([b, h, t, 1]), DType::F32);
    (o, lse)
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

/// Rows read as vectors of 4: x itself where its rows are contiguous and its strides and start
/// offset multiples of 4 elements, else a contiguous copy.
fn vector_rows(x: CubeTensor) -> CubeTensor {
    let s = x.meta.strides();
    let lens = [s[0], s[1], s[2]];
    match s[3] == 1 && vector_width_at(&lens, x.dtype.size(), LANES, &[&x]) == LANES {
        true => x,
        false => into_contiguous(x),
    }
}

/// Whether the kernels run here: heads the kernels take ([`flash_takes`]), the shared memory and
/// units of a cube, and the grid.
fn kernels_fit(q: &CubeTensor) -> bool {
    let [b, h, t, d] = q.meta.shape.dims::<4>();
    let props = q.client.properties();
    flash_takes(d, q.dtype)
        && SHARED_BYTES <= props.hardware.max_shared_memory_size
        && (UNITS as u32) <= props.hardware.max_units_per_cube
        && b * h <= MAX_GRID
        && t > 0
}

/// The gradient w.r.t. `qkv [batch, seq, 3·head·d]` (q's heads, then k's, then v's; q's dtype) of
/// causal attention from its output o and output gradient dy `[batch, head, seq, d]` (any strides,
/// rows contiguous), q, k, v as [`flash_forward`] took them, its log-sum-exp, the dropout and the
/// scale: three kernels ([`row_dots_kernel`], [`flash_backward_kv_kernel`],
/// [`flash_backward_q_kernel`]); `None` where [`flash_forward`] would be.
#[allow(clippy::too_many_arguments)]
pub(crate) fn flash_backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    o: CubeTensor,
    lse: CubeTensor,
    dy: CubeTensor,
    drop: Option<(CubeTensor, f64)>,
    scale: f64,
) -> Option<CubeTensor> {
    let [b, h, t, d] = q.meta.shape.dims::<4>();
    assert!(
        [&k, &v, &o, &dy].iter().all(|x| x.dtype == q.dtype),
        "flash attention backward: q, k, v, o, dy in one dtype"
    );
    if !kernels_fit(&q) {
        return None;
    }
    let [q, k, v, o, dy] = [q, k, v, o, dy].map(vector_rows);
    let lse = into_contiguous(lse);
    let drop = crate::kernels::DropArgs::new(drop, &q);
    let (client, device) = (q.client.clone(), q.device.clone());
    let dtype = dtype_to_storage_type(q.dtype);
    let blocks = t.div_ceil(BR);
    let dots = row_dots(&dy, o);
    let ds = empty_device_dtype(
        client.clone(),
        device.clone(),
        Shape::new([b * h, blocks * (blocks + 1) / 2, BR, HEAD]),
        DType::F32,
    );
    let dqkv = empty_device_contiguous_dtype(
        client.clone(),
        device,
        Shape::new([b, t, 3 * h * d]),
        q.dtype,
    );
    let grid = CubeCount::Static(blocks as u32, (b * h) as u32, 1);
    // Safety: rows are clamped into `..t` for the loads of q, k, v, dy and into the tile for ds;
    // stores check `row < t` (dqkv, dots) or stay in the tile (ds); vector offsets are multiples
    // of 4 elements (checked above), every head `< b·h`.
    unsafe {
        flash_backward_kv_kernel::launch_unchecked(
            &client,
            grid.clone(),
            CubeDim::new_1d(UNITS as u32),
            LANES,
            q.into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.into_tensor_arg(),
            dy.into_tensor_arg(),
            lse.into_tensor_arg(),
            dots.into_tensor_arg(),
            drop.seed.into_tensor_arg(),
            ds.clone().into_tensor_arg(),
            dqkv.clone().into_tensor_arg(),
            scale as f32,
            drop.threshold,
            drop.inv_keep,
            blocks,
            drop.drop,
            dtype,
        );
        flash_backward_q_kernel::launch_unchecked(
            &client,
            grid,
            CubeDim::new_1d(UNITS as u32),
            LANES,
            k.into_tensor_arg(),
            ds.into_tensor_arg(),
            dqkv.clone().into_tensor_arg(),
            scale as f32,
            blocks,
            dtype,
        );
    }
    Some(dqkv)
}

/// `Σ_d dy·o` of each query (FlashAttention's `D`) of dy and o `[batch, head, seq, d]` (one
/// dtype, any strides, rows contiguous; d = 64): `[batch, head, seq, 1]` in f32
/// ([`row_dots_kernel`]).
pub(crate) fn row_dots(dy: &CubeTensor, o: CubeTensor) -> CubeTensor {
    let [b, h, t, _] = dy.meta.shape.dims::<4>();
    let [dy, o] = [dy.clone(), o].map(vector_rows);
    let rows = b * h * t;
    let dots = empty_device_dtype(
        dy.client.clone(),
        dy.device.clone(),
        Shape::new([b, h, t, 1]),
        DType::F32,
    );
    let dtype = dtype_to_storage_type(dy.dtype);
    // Safety: one unit a row, `r < rows` checked; vector offsets are multiples of 4 elements.
    unsafe {
        row_dots_kernel::launch_unchecked(
            &dy.client,
            CubeCount::Static(rows.div_ceil(UNITS) as u32, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            LANES,
            dy.clone().into_tensor_arg(),
            o.into_tensor_arg(),
            dots.clone().into_tensor_arg(),
            rows,
            dtype,
        );
    }
    dots
}

/// The same gradient without the kernels (Burn's matmuls and the softmax-gradient row kernel),
/// where [`flash_backward`] does not apply.
#[allow(clippy::too_many_arguments)]
pub(crate) fn materialised_backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    lse: CubeTensor,
    dy: CubeTensor,
    bias: CubeTensor,
    drop: Option<(CubeTensor, f64)>,
    scale: f64,
) -> CubeTensor {
    let t = |x: CubeTensor| CubeBackend::float_swap_dims(x, 2, 3);
    let s = CubeBackend::float_matmul(q.clone(), t(k.clone()));
    let dp = CubeBackend::float_matmul(dy.clone(), t(v));
    let (pd, ds) = crate::kernels::launch_softmax_grad_lse(s, bias, 0, lse, dp, drop, scale);
    let dv = CubeBackend::float_matmul(t(pd), dy);
    let dq = CubeBackend::float_matmul(ds.clone(), k);
    let dk = CubeBackend::float_matmul(t(ds), q);
    crate::kernels::launch_merge_heads([dq, dk, dv].map(into_contiguous))
}
