//! f16 causal attention forward on workgroup-scope cooperative matrices
//! (`VK_NV_cooperative_matrix2`, see `lora_core::coopmat`).
//!
//! [`crate::flash`]'s forward kernel multiplies with f32 FMAs: 641 µs a layer of GPT-2 small at
//! 8 × 1024 in f16 on an H100, against 102 µs for cuDNN's. Here a cube of 256 units takes 128
//! queries of one head and walks the keys up to the diagonal 64 at a time; `q·kᵀ` and `p·v` are
//! one workgroup-scope matrix product each. q is loaded once by a clamped tensor load; each
//! step's k and v are staged in shared memory by the units (vector loads, fetched a step ahead),
//! which ran faster than a tensor load a step (the forward 503 → 340 µs a layer in the training
//! step). The online softmax runs on the units in between: the scores go through an f16 tile in
//! shared memory, two units take a row (every other column), the probabilities go back in place
//! and are loaded as the A matrix, and `p·v` accumulates in an f32 accumulator. The row max the
//! probabilities use is raised only when a block passes it by more than [`LAZY`], and only then
//! are the output's rows rescaled (through the tile).
//!
//! The backward pass ([`flash_backward_cm`]) is FlashAttention-2's: [`flash_cm_kv_kernel`] holds
//! 128 keys' kᵀ and vᵀ as B matrices and walks the queries 64 at a time, q and dy staged in
//! shared memory by the units (fetched a step ahead), four workgroup-scope products a step (the
//! scores, dp, and dv, dk from the f16 tile loaded transposed); [`flash_cm_q_kernel`] multiplies
//! the stored softmax gradient by k, both staged the same way. ~470 + 115 µs a layer in the
//! training step, where the materialised pass (query blocks, Burn's and our products, the
//! softmax-gradient kernel) took ~1.3 ms.

use crate::flash::forward_outputs;
use crate::kernels::{DropArgs, SHIFT32};
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, empty_device_dtype};
use burn_cubecl::tensor::CubeTensor;
use cubecl::cmma::{self, Cube as WorkGroup, MatrixIdent, MatrixLayout};
use cubecl::prelude::*;
use half::f16;
use lora_core::coopmat::{accumulator, offers, operand};
use lora_core::kernels::{keep_factor, row_key};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Queries of a cube, keys of a step, the head size, units of a cube.
const BQ: usize = 128;
const BKV: usize = 64;
const HEAD: usize = 64;
const UNITS: u32 = 256;
/// Columns of a unit: every other one of its row of 64 keys (or of the output's 64).
const COLS: usize = 32;
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
/// computes it (the same output, log-sum-exp and hashed dropout; the scores rounded to f16).
///
/// q `[batch, head, seq, 64]` as [`reads`] takes it (each head's rows one 64-column block of the
/// buffer seen as rows of the row stride); k, v `[batch, head, seq, 64]` (vectors of 8,
/// [`reads_vectors`]); o `[batch, seq, head, 64]` contiguous; lse `[batch, head, seq, 1]` (f32).
/// Cube `(x, y)`: query block `blocks − 1 − x` (the longest first) of head `y`. Unit u takes row
/// `u / 2` of the tile at the columns `u % 2 + 2·j`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, clippy::needless_borrow)]
fn flash_cm_kernel<N: Size>(
    q: &Tensor<f16>,
    k: &Tensor<Vector<f16, N>>,
    v: &Tensor<Vector<f16, N>>,
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

    let (qv, qr, qc) = head_view(q, bi, hi);
    // The scores, then the probabilities (f16, `[128, HS]`); the step's k and v (`[64, HS]`).
    let mut st = Shared::<[f16]>::new_slice(TILE);
    let mut sk = Shared::<[f16]>::new_slice(comptime!(BKV * HS));
    let mut sv = Shared::<[f16]>::new_slice(comptime!(BKV * HS));
    let mut raised = Shared::<[u32]>::new_slice(1usize);

    let mut qa = operand(MatrixIdent::A, BQ, BKV, HEAD, MatrixLayout::Undefined);
    // k's rows as the columns of b: kᵀ, column-major in sk.
    let mut kb = operand(MatrixIdent::B, BQ, BKV, HEAD, MatrixLayout::ColMajor);
    let mut pa = operand(MatrixIdent::A, BQ, HEAD, BKV, MatrixLayout::RowMajor);
    let mut vb = operand(MatrixIdent::B, BQ, HEAD, BKV, MatrixLayout::RowMajor);
    let mut acc = accumulator(BQ, BKV, HEAD);
    let acc_o = accumulator(BQ, HEAD, BKV);
    // The output's rows rescaled, as f16 through the tile.
    let mut r16 = cmma::Matrix::<f16, WorkGroup>::from_value(
        MatrixIdent::Accumulator,
        BQ,
        HEAD,
        BKV,
        MatrixLayout::Undefined,
        f16::new(0.0),
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
    let mut rk = Array::<Vector<f16, N>>::new(2usize);
    let mut rv = Array::<Vector<f16, N>>::new(2usize);
    let steps = (q0 as usize + BQ).div_ceil(BKV);
    fetch_rows::<N>(k, bi, hi, 0, t, &mut rk, 2usize);
    fetch_rows::<N>(v, bi, hi, 0, t, &mut rv, 2usize);
    for kbi in 0..steps {
        let k0 = kbi * BKV;
        put_rows::<N>(&rk, &mut sk, 2usize);
        put_rows::<N>(&rv, &mut sv, 2usize);
        if u == 0 {
            raised[0] = 0;
        }
        sync_cube();
        if kbi + 1 < steps {
            fetch_rows::<N>(k, bi, hi, k0 + BKV, t, &mut rk, 2usize);
            fetch_rows::<N>(v, bi, hi, k0 + BKV, t, &mut rv, 2usize);
        }
        // Scores: q · kᵀ, as f16 into the tile.
        cmma::load(&mut kb, &sk, HS as u32);
        cmma::fill(&mut acc, 0.0);
        cmma::execute::<f16, f16, f32, f32, WorkGroup>(&qa, &kb, &acc, &acc);
        let s16 = cmma::cast::<f32, f16, WorkGroup>(&acc);
        cmma::store(&mut st, &s16, HS as u32, MatrixLayout::RowMajor);
        sync_cube();
        // The online softmax of the unit's half row (every other column).
        let mut mx = f32::new(MASKED);
        #[unroll]
        for j in 0..COLS {
            let col = k0 + c0 + 2 * j;
            let s = f32::cast_from(st[r * HS + c0 + 2 * j]) * scale;
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
                let col = k0 + c0 + 2 * j;
                p *= keep_factor(key, col, threshold, inv_keep, SHIFT32);
            }
            st[r * HS + c0 + 2 * j] = f16::cast_from(p);
        }
        sum += plane_shuffle_xor(sum, 1);
        l = l * alpha + sum;
        sync_cube();
        cmma::load(&mut pa, &st, HS as u32);
        cmma::load(&mut vb, &sv, HS as u32);
        // A raised max rescales the output's rows through the tile (rare after the first
        // block); then o += p · v in the accumulator.
        if raised[0] == 1 {
            sync_cube();
            let o16 = cmma::cast::<f32, f16, WorkGroup>(&acc_o);
            cmma::store(&mut st, &o16, HS as u32, MatrixLayout::RowMajor);
            sync_cube();
            #[unroll]
            for j in 0..COLS {
                let at = r * HS + c0 + 2 * j;
                st[at] = f16::cast_from(f32::cast_from(st[at]) * alpha);
            }
            sync_cube();
            cmma::load_with_layout(&mut r16, &st, HS as u32, MatrixLayout::RowMajor);
            let rescaled = cmma::cast::<f16, f32, WorkGroup>(&r16);
            cmma::execute::<f16, f16, f32, f32, WorkGroup>(&pa, &vb, &rescaled, &acc_o);
        } else {
            cmma::execute::<f16, f16, f32, f32, WorkGroup>(&pa, &vb, &acc_o, &acc_o);
        }
        sync_cube();
    }
    let o16 = cmma::cast::<f32, f16, WorkGroup>(&acc_o);
    cmma::store(&mut st, &o16, HS as u32, MatrixLayout::RowMajor);
    sync_cube();
    if row < t {
        let base = ((bi * t + row) * heads + hi) * HEAD + c0;
        let inv = 1.0 / l;
        #[unroll]
        for j in 0..COLS {
            o[base + 2 * j] = f16::cast_from(f32::cast_from(st[r * HS + c0 + 2 * j]) * inv);
        }
        if c0 == 0 {
            lse[bh * t + row] = m + f32::ln(l);
        }
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

/// Whether `t`'s device runs a kernel of 256 units with `shared` bytes of shared memory (plus
/// the driver's reserve for workgroup-scope matrices) and workgroup-scope products of `tiles`
/// ([`lora_core::coopmat::offers`]).
fn runs(t: &CubeTensor, shared: usize, tiles: &[[usize; 3]]) -> bool {
    let hardware = &t.client.properties().hardware;
    shared + hardware.cube_mma_reserved_shared_memory <= hardware.max_shared_memory_size
        && tiles.iter().all(|&tile| offers(t, UNITS, tile))
}

/// Whether the device runs [`flash_cm_kernel`]: its two products and its shared memory (the
/// f16 tiles and the flag).
fn available(t: &CubeTensor) -> bool {
    let shared = (TILE + 2 * BKV * HS) * 2 + 4;
    runs(t, shared, &[[BQ, BKV, HEAD], [BQ, HEAD, BKV]])
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
        .all(|x| x.dtype == DType::F16 && x.meta.shape == q.meta.shape);
    if !fits || !reads(q) || t == 0 || b * h > 65_535 || !available(q) {
        return None;
    }
    let (k, v) = (vector_rows(k), vector_rows(v));
    let drop = DropArgs::new(drop, q);
    let client = q.client.clone();
    let (o, lse) = forward_outputs(q);
    let blocks = t.div_ceil(BQ);
    // Safety: q's load is tensor-addressed and clamped to its buffer's rows; k and v rows are
    // clamped into `..t` for the units' vector loads (offsets multiples of 8 elements); the
    // units' shared accesses stay in their row of a tile; stores check `row < t`.
    unsafe {
        flash_cm_kernel::launch_unchecked(
            &client,
            CubeCount::Static(blocks as u32, (b * h) as u32, 1),
            CubeDim::new_1d(UNITS),
            VEC,
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
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

/// Queries of a backward step, keys of a backward cube, elements of a vector.
const BQB: usize = 64;
const BKB: usize = 128;
const VEC: usize = 8;
/// Row strides (f16) of the q and dy tiles and of the score tile in shared memory.
const HS: usize = 72;
const TS: usize = 136;
/// The score tile's shared memory: `[64, TS]` for scores, `[128, HS]` for the output gradients.
const TILE: usize = 9216;
/// Columns of a unit in the backward pass's score tile: every fourth of its row of 128 keys.
const BCOLS: usize = 32;

/// Launches of [`flash_cm_kv_kernel`] in this process ([`backward_launches`]).
static BACKWARD_LAUNCHES: AtomicUsize = AtomicUsize::new(0);

/// How many attention backward passes ran on [`flash_cm_kv_kernel`] in this process.
pub fn backward_launches() -> usize {
    BACKWARD_LAUNCHES.load(Ordering::Relaxed)
}

/// Tiles of the softmax gradient before query block `i` of a head: query block i (64 queries)
/// has `i / 2 + 1` key blocks (128 keys) up to the diagonal.
#[cube]
fn tiles_before(i: usize) -> usize {
    // Σ_{i' < i} ⌊i'/2⌋ is a² − a for i = 2a and a² for i = 2a + 1.
    let a = i / 2;
    a * a - a + a * (i % 2) + i
}

/// Rows `r0 .. r0 + 32·passes` of head `(bi, hi)` of x `[batch, head, seq, 64]` (rows past t
/// re-read the last), `passes` vectors a unit, into `regs`: issued here, waited for in
/// [`put_rows`].
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_rows<N: Size>(
    x: &Tensor<Vector<f16, N>>,
    bi: usize,
    hi: usize,
    r0: usize,
    t: usize,
    regs: &mut Array<Vector<f16, N>>,
    #[comptime] passes: usize,
) {
    let u = UNIT_POS_X as usize;
    let base = (bi * x.stride(0) + hi * x.stride(1)) / VEC;
    let rs = x.stride(2) / VEC;
    #[unroll]
    for i in 0..passes {
        let row = (r0 + u / 8 + 32 * i).min(t - 1);
        regs[i] = x[base + row * rs + u % 8];
    }
}

/// [`fetch_rows`]' vectors into the tile `sh` (`[32·passes, HS]`).
#[cube]
fn put_rows<N: Size>(
    regs: &Array<Vector<f16, N>>,
    sh: &mut Shared<[f16]>,
    #[comptime] passes: usize,
) {
    let u = UNIT_POS_X as usize;
    #[unroll]
    for i in 0..passes {
        let at = (u / 8 + 32 * i) * HS + (u % 8) * VEC;
        #[unroll]
        for e in 0..VEC {
            sh[at + e] = regs[i].extract(e);
        }
    }
}

/// Causal attention's backward pass in f16 for one head's 128 keys (FlashAttention-2's outer
/// loop over keys), as [`crate::flash`]'s f32 kernels compute it: the gradients of k and v, and
/// the softmax gradient ds per tile for [`flash_cm_q_kernel`].
///
/// k, v as B matrices held through the loop; for each block of 64 queries from the diagonal on,
/// q and dy are staged in shared memory (fetched a step ahead), `s = q·kᵀ` and `dp = dy·vᵀ` are
/// workgroup-scope products stored as f16 tiles, the units turn them into `pd = p·m` and `ds =
/// p·(dp·m − dots)` (p from the log-sum-exp, m the hashed dropout), and `dv += pdᵀ·dy`, `dk +=
/// dsᵀ·q` load the tile transposed. q, dy `[batch, head, seq, 64]` (vectors of 8); k, v as
/// [`reads`] takes them; lse, dots `[batch, head, seq, 1]` (f32); ds `[batch·head·tiles, 64,
/// 128]` (f16, vectors of 8, [`tiles_before`]); dqkv `[batch, seq, 3·head·64]` (k's and v's
/// columns written). Cube `(x, y)`: key block x (the longest first) of head y; unit u takes row
/// `u / 4` of the score tile at the columns `u % 4 + 4·j`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, clippy::needless_borrow)]
fn flash_cm_kv_kernel<N: Size>(
    q: &Tensor<Vector<f16, N>>,
    dy: &Tensor<Vector<f16, N>>,
    k: &Tensor<f16>,
    v: &Tensor<f16>,
    lse: &Tensor<f32>,
    dots: &Tensor<f32>,
    seed: &Tensor<f32>,
    ds: &mut Tensor<Vector<f16, N>>,
    dqkv: &mut Tensor<Vector<f16, N>>,
    scale: f32,
    threshold: u32,
    inv_keep: f32,
    #[comptime] drop: bool,
) {
    let heads = k.shape(1);
    let t = k.shape(2);
    let bh = CUBE_POS_Y as usize;
    let (bi, hi) = (bh / heads, bh % heads);
    let jb = CUBE_POS_X as usize;
    let k0 = jb * BKB;
    let qblocks = t.div_ceil(BQB);
    let head_tiles = tiles_before(qblocks);
    let u = UNIT_POS_X as usize;
    let (r, c0) = (u / 4, u % 4);

    let mut sq = Shared::<[f16]>::new_slice(comptime!(BQB * HS));
    let mut sy = Shared::<[f16]>::new_slice(comptime!(BQB * HS));
    let mut st = Shared::<[f16]>::new_slice(TILE);

    let (kv, kr, kc) = head_view(k, bi, hi);
    let (vv, vr, vc) = head_view(v, bi, hi);
    let mut kt = operand(MatrixIdent::B, BQB, BKB, HEAD, MatrixLayout::Undefined);
    let mut vt = operand(MatrixIdent::B, BQB, BKB, HEAD, MatrixLayout::Undefined);
    let kw = kv.slice(seq![kr + k0 as u32, kc], seq![BKB as u32, HEAD as u32]);
    cmma::load_tensor(&mut kt, &kw.permuted(seq![1, 0]));
    let vw = vv.slice(seq![vr + k0 as u32, vc], seq![BKB as u32, HEAD as u32]);
    cmma::load_tensor(&mut vt, &vw.permuted(seq![1, 0]));
    // The step's A operand (q, then dy) and the scores' accumulator, `[64, 128]`.
    let mut xa = operand(MatrixIdent::A, BQB, BKB, HEAD, MatrixLayout::RowMajor);
    let mut acc = accumulator(BQB, BKB, HEAD);
    // The tile transposed (pdᵀ, then dsᵀ) and the B operand (dy, then q) of the gradients,
    // `[128, 64]` over the 64 queries.
    let mut ta = operand(MatrixIdent::A, BKB, HEAD, BQB, MatrixLayout::ColMajor);
    let mut xb = operand(MatrixIdent::B, BKB, HEAD, BQB, MatrixLayout::RowMajor);
    let dk = accumulator(BKB, HEAD, BQB);
    let dv = accumulator(BKB, HEAD, BQB);

    let mut rq = Array::<Vector<f16, N>>::new(2usize);
    let mut ry = Array::<Vector<f16, N>>::new(2usize);
    let mut p = Array::<f32>::new(BCOLS);
    let i0 = k0 / BQB;
    fetch_rows::<N>(q, bi, hi, i0 * BQB, t, &mut rq, 2usize);
    fetch_rows::<N>(dy, bi, hi, i0 * BQB, t, &mut ry, 2usize);
    for i in i0..qblocks {
        let q0 = i * BQB;
        put_rows::<N>(&rq, &mut sq, 2usize);
        put_rows::<N>(&ry, &mut sy, 2usize);
        sync_cube();
        if i + 1 < qblocks {
            fetch_rows::<N>(q, bi, hi, q0 + BQB, t, &mut rq, 2usize);
            fetch_rows::<N>(dy, bi, hi, q0 + BQB, t, &mut ry, 2usize);
        }
        // s = q·kᵀ, as f16 into the tile.
        cmma::load(&mut xa, &sq, HS as u32);
        cmma::fill(&mut acc, 0.0);
        cmma::execute::<f16, f16, f32, f32, WorkGroup>(&xa, &kt, &acc, &acc);
        let s16 = cmma::cast::<f32, f16, WorkGroup>(&acc);
        cmma::store(&mut st, &s16, TS as u32, MatrixLayout::RowMajor);
        sync_cube();
        // p from the log-sum-exp (0 above the diagonal and past the sequence), pd = p·m.
        let row = q0 + r;
        let at = bh * t + row.min(t - 1);
        let (l, dd) = (lse[at], dots[at]);
        let mut key = 0u32;
        if comptime![drop] {
            key = row_key(seed, bh * t + row);
        }
        #[unroll]
        for j in 0..BCOLS {
            let c = c0 + 4 * j;
            let col = k0 + c;
            let e = f32::exp(f32::cast_from(st[r * TS + c]) * scale - l);
            let pj = select(col <= row && row < t, e, 0.0);
            p[j] = pj;
            let mut pd = pj;
            if comptime![drop] {
                pd *= keep_factor(key, col, threshold, inv_keep, SHIFT32);
            }
            st[r * TS + c] = f16::cast_from(pd);
        }
        sync_cube();
        // dv += pdᵀ·dy.
        cmma::load(&mut ta, &st, TS as u32);
        cmma::load(&mut xb, &sy, HS as u32);
        cmma::execute::<f16, f16, f32, f32, WorkGroup>(&ta, &xb, &dv, &dv);
        // dp = dy·vᵀ, as f16 into the tile once pdᵀ is loaded.
        cmma::load(&mut xa, &sy, HS as u32);
        cmma::fill(&mut acc, 0.0);
        cmma::execute::<f16, f16, f32, f32, WorkGroup>(&xa, &vt, &acc, &acc);
        let dp16 = cmma::cast::<f32, f16, WorkGroup>(&acc);
        sync_cube();
        cmma::store(&mut st, &dp16, TS as u32, MatrixLayout::RowMajor);
        sync_cube();
        // ds = p·(dp·m − dots).
        #[unroll]
        for j in 0..BCOLS {
            let c = c0 + 4 * j;
            let mut g = f32::cast_from(st[r * TS + c]);
            if comptime![drop] {
                g *= keep_factor(key, k0 + c, threshold, inv_keep, SHIFT32);
            }
            st[r * TS + c] = f16::cast_from(select(p[j] > 0.0, p[j] * (g - dd), 0.0));
        }
        sync_cube();
        // dk += dsᵀ·q; ds to its tile for q's gradient.
        cmma::load(&mut ta, &st, TS as u32);
        cmma::load(&mut xb, &sq, HS as u32);
        cmma::execute::<f16, f16, f32, f32, WorkGroup>(&ta, &xb, &dk, &dk);
        let tile = (bh * head_tiles + tiles_before(i) + jb) * (BQB * BKB / VEC);
        #[unroll]
        for w in 0..4usize {
            let (tr, tv) = (u / 16 + 16 * w, u % 16);
            let mut x = Vector::<f16, N>::empty();
            #[unroll]
            for e in 0..VEC {
                x.insert(e, st[tr * TS + tv * VEC + e]);
            }
            ds[tile + tr * (BKB / VEC) + tv] = x;
        }
        sync_cube();
    }
    // dk·scale and dv into their columns of dqkv, through the tile as `[128, HS]`.
    let dk16 = cmma::cast::<f32, f16, WorkGroup>(&dk);
    cmma::store(&mut st, &dk16, HS as u32, MatrixLayout::RowMajor);
    sync_cube();
    put_grad::<N>(&st, dqkv, bi, hi, heads, t, k0, 1, scale, 4usize);
    sync_cube();
    let dv16 = cmma::cast::<f32, f16, WorkGroup>(&dv);
    cmma::store(&mut st, &dv16, HS as u32, MatrixLayout::RowMajor);
    sync_cube();
    put_grad::<N>(&st, dqkv, bi, hi, heads, t, k0, 2, 1.0, 4usize);
}

/// The first `32·passes` rows of the tile `sh` (`[.., HS]`) times `scale` as rows `r0 ..` of part
/// `part` (0 q, 1 k, 2 v) of head hi's columns of dqkv `[batch, seq, 3·head·64]`, rows past t
/// left out.
#[cube]
#[allow(clippy::too_many_arguments)]
fn put_grad<N: Size>(
    sh: &Shared<[f16]>,
    dqkv: &mut Tensor<Vector<f16, N>>,
    bi: usize,
    hi: usize,
    heads: usize,
    t: usize,
    r0: usize,
    part: usize,
    scale: f32,
    #[comptime] passes: usize,
) {
    let u = UNIT_POS_X as usize;
    #[unroll]
    for w in 0..passes {
        let (tr, tv) = (u / 8 + 32 * w, u % 8);
        let row = r0 + tr;
        if row < t {
            let mut x = Vector::<f16, N>::empty();
            #[unroll]
            for e in 0..VEC {
                x.insert(
                    e,
                    f16::cast_from(f32::cast_from(sh[tr * HS + tv * VEC + e]) * scale),
                );
            }
            dqkv[((bi * t + row) * 3 * heads + part * heads + hi) * (HEAD / VEC) + tv] = x;
        }
    }
}

/// q's gradient from [`flash_cm_kv_kernel`]'s ds: `dq = Σ_key ds·k·scale` over the key blocks up
/// to the diagonal, one workgroup-scope product `[64, 64] += [64, 128] · [128, 64]` a block, the
/// ds tile and k's rows staged in shared memory by the units (fetched a block ahead). k `[batch,
/// head, seq, 64]` and ds as there (vectors of 8); dqkv as there (q's columns written). Cube `(x,
/// y)`: query block `blocks − 1 − x` (the longest first) of head y.
#[cube(launch_unchecked)]
fn flash_cm_q_kernel<N: Size>(
    k: &Tensor<Vector<f16, N>>,
    ds: &Tensor<Vector<f16, N>>,
    dqkv: &mut Tensor<Vector<f16, N>>,
    scale: f32,
) {
    let heads = k.shape(1);
    let t = k.shape(2);
    let bh = CUBE_POS_Y as usize;
    let (bi, hi) = (bh / heads, bh % heads);
    let qblocks = t.div_ceil(BQB);
    let i = qblocks - 1 - CUBE_POS_X as usize;
    let u = UNIT_POS_X as usize;
    let first = (bh * tiles_before(qblocks) + tiles_before(i)) * (BQB * BKB / VEC);
    let last = i / 2;

    // The ds tile (`[64, TS]`) and k's rows (`[128, HS]`).
    let mut sd = Shared::<[f16]>::new_slice(comptime!(BQB * TS));
    let mut sk = Shared::<[f16]>::new_slice(TILE);
    let mut a = operand(MatrixIdent::A, BQB, HEAD, BKB, MatrixLayout::RowMajor);
    let mut b = operand(MatrixIdent::B, BQB, HEAD, BKB, MatrixLayout::RowMajor);
    let acc = accumulator(BQB, HEAD, BKB);
    let mut rd = Array::<Vector<f16, N>>::new(4usize);
    let mut rk = Array::<Vector<f16, N>>::new(4usize);
    #[unroll]
    for w in 0..4usize {
        rd[w] = ds[first + (u / 16 + 16 * w) * (BKB / VEC) + u % 16];
    }
    fetch_rows::<N>(k, bi, hi, 0, t, &mut rk, 4usize);
    for jb in 0..last + 1 {
        #[unroll]
        for w in 0..4usize {
            let at = (u / 16 + 16 * w) * TS + (u % 16) * VEC;
            #[unroll]
            for e in 0..VEC {
                sd[at + e] = rd[w].extract(e);
            }
        }
        put_rows::<N>(&rk, &mut sk, 4usize);
        sync_cube();
        if jb < last {
            let next = first + (jb + 1) * (BQB * BKB / VEC);
            #[unroll]
            for w in 0..4usize {
                rd[w] = ds[next + (u / 16 + 16 * w) * (BKB / VEC) + u % 16];
            }
            fetch_rows::<N>(k, bi, hi, (jb + 1) * BKB, t, &mut rk, 4usize);
        }
        cmma::load(&mut a, &sd, TS as u32);
        cmma::load(&mut b, &sk, HS as u32);
        cmma::execute::<f16, f16, f32, f32, WorkGroup>(&a, &b, &acc, &acc);
        sync_cube();
    }
    let o16 = cmma::cast::<f32, f16, WorkGroup>(&acc);
    cmma::store(&mut sk, &o16, HS as u32, MatrixLayout::RowMajor);
    sync_cube();
    put_grad::<N>(&sk, dqkv, bi, hi, heads, t, i * BQB, 0, scale, 2usize);
}

/// Whether the device runs the backward kernels: their three products and the larger shared
/// memory of the two (the kv kernel's q, dy and score tiles).
fn backward_available(t: &CubeTensor) -> bool {
    let shared = (2 * BQB * HS + TILE) * 2;
    runs(
        t,
        shared,
        &[[BQB, BKB, HEAD], [BKB, HEAD, BQB], [BQB, HEAD, BKB]],
    )
}

/// x itself where it reads as rows of vectors of 8 ([`reads_vectors`]), else a contiguous copy.
fn vector_rows(x: &CubeTensor) -> CubeTensor {
    match reads_vectors(x) {
        true => x.clone(),
        false => into_contiguous(x.clone()),
    }
}

/// Whether x `[batch, head, seq, 64]` reads as rows of vectors of 8: unit column stride, each
/// head's start and the row stride multiples of 8 elements, an aligned start.
fn reads_vectors(x: &CubeTensor) -> bool {
    let [b, h, _, d] = x.meta.shape.dims::<4>();
    let s = x.meta.strides();
    d == HEAD
        && s[3] == 1
        && s[2].is_multiple_of(VEC)
        && x.handle.offset_start.is_none_or(|o| o.is_multiple_of(16))
        && (0..b).all(|bi| (0..h).all(|hi| (bi * s[0] + hi * s[1]).is_multiple_of(VEC)))
}

/// The gradient w.r.t. `qkv [batch, seq, 3·head·64]` (f16) of [`flash_forward_cm`]'s attention,
/// as [`crate::flash::flash_backward`] returns it, from q, k, v, the output o and its gradient dy
/// `[batch, head, seq, 64]` and the log-sum-exp: the row dots, [`flash_cm_kv_kernel`] and
/// [`flash_cm_q_kernel`]. `None` where [`flash_forward_cm`] would be.
#[allow(clippy::too_many_arguments)]
pub(crate) fn flash_backward_cm(
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
    o: &CubeTensor,
    lse: &CubeTensor,
    dy: &CubeTensor,
    drop: Option<(CubeTensor, f64)>,
    scale: f64,
) -> Option<CubeTensor> {
    let [b, h, t, d] = q.meta.shape.dims::<4>();
    let f16_like = |x: &CubeTensor| x.dtype == DType::F16 && x.meta.shape == q.meta.shape;
    if ![q, k, v, o, dy].iter().all(|x| f16_like(x))
        || ![k, v].iter().all(|x| reads(x))
        || t == 0
        || b * h > 65_535
        || !backward_available(q)
    {
        return None;
    }
    let (qv, yv, kv) = (vector_rows(q), vector_rows(dy), vector_rows(k));
    let lse = into_contiguous(lse.clone());
    let dots = crate::flash::row_dots(&yv, o.clone());
    let drop = DropArgs::new(drop, q);
    let (client, device) = (q.client.clone(), q.device.clone());
    let (qblocks, kblocks) = (t.div_ceil(BQB), t.div_ceil(BKB));
    // Tiles of a head: query block i has i / 2 + 1 key blocks.
    let tiles = (0..qblocks).map(|i| i / 2 + 1).sum::<usize>();
    let ds = empty_device_dtype(
        client.clone(),
        device.clone(),
        Shape::new([b * h * tiles, BQB, BKB]),
        DType::F16,
    );
    let dqkv = empty_device_contiguous_dtype(
        client.clone(),
        device,
        Shape::new([b, t, 3 * h * d]),
        DType::F16,
    );
    // Safety: q and dy rows are clamped into `..t` for the units' vector loads (offsets
    // multiples of 8 elements, checked above); k, v, ds loads are tensor-addressed and clamped
    // to their buffers; stores check `row < t` (dqkv) or stay in the tile (ds).
    unsafe {
        flash_cm_kv_kernel::launch_unchecked(
            &client,
            CubeCount::Static(kblocks as u32, (b * h) as u32, 1),
            CubeDim::new_1d(UNITS),
            VEC,
            qv.into_tensor_arg(),
            yv.into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            lse.into_tensor_arg(),
            dots.into_tensor_arg(),
            drop.seed.into_tensor_arg(),
            ds.clone().into_tensor_arg(),
            dqkv.clone().into_tensor_arg(),
            scale as f32,
            drop.threshold,
            drop.inv_keep,
            drop.drop,
        );
        flash_cm_q_kernel::launch_unchecked(
            &client,
            CubeCount::Static(qblocks as u32, (b * h) as u32, 1),
            CubeDim::new_1d(UNITS),
            VEC,
            kv.into_tensor_arg(),
            ds.into_tensor_arg(),
            dqkv.clone().into_tensor_arg(),
            scale as f32,
        );
    }
    BACKWARD_LAUNCHES.fetch_add(1, Ordering::Relaxed);
    Some(dqkv)
}
