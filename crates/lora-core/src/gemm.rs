//! An f32 matrix product for GPUs without f32 tensor cores, as one CubeCL kernel.
//!
//! Burn's f32 matmuls on `wgpu` / `vulkan` run cubecl's unit kernels (no f32 cooperative matrices
//! there), 13–18 TFLOP/s on an H100 for GPT-2's products; this one 37–41. [`gemm_kernel`] is the
//! classic SIMT tiling: a cube of 256 units computes a `BM × BN` tile of the output (64 or 128
//! each, [`tile_shape`]), each unit a `BM/16 × BN/16` block in registers, over steps of 16 along k
//! whose operand tiles are staged in shared memory (two buffers: the next step's global loads are
//! in flight while this one computes). Operands are read 4 f32 at a time along whichever of their
//! two last dims is contiguous, so `x·w`, `dy·wᵀ` and `xᵀ·dy` all run without a copy; a long
//! reduction with a small output is split in parts ([`k_splits`]).

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Steps along k, units of a cube.
const BK: usize = 16;
const UNITS: usize = 256;
/// f32 lanes of the operands' vectors.
const LANES: usize = 4;

/// Four vectors of a 4 × 4 block of a tile: vector `j` is `t[base + min(o0 + j, o_len - 1)·so +
/// ci / 4]`, where `o` walks the operand's strided dim (vectors `so` apart) and `ci` is the element
/// offset along its contiguous dim. Rows past `o_len` re-read the last one (their results are
/// never written).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_block<N: Size>(
    t: &Tensor<Vector<f32, N>>,
    base: usize,
    o0: usize,
    o_len: usize,
    so: usize,
    ci: usize,
    regs: &mut Array<Vector<f32, N>>,
) {
    #[unroll]
    for j in 0..LANES {
        let o = (o0 + j).min(o_len - 1);
        regs[j] = t[base + o * so + ci / LANES];
    }
}

/// The block of [`load_block`] into shared rows `row_vecs` vectors apart from `off`, one row per
/// step along k: transposed when the operand's contiguous dim is k (its vectors run along k).
#[cube]
fn store_block<N: Size>(
    sh: &mut Shared<[Vector<f32, N>]>,
    off: usize,
    row_vecs: usize,
    regs: &Array<Vector<f32, N>>,
    #[comptime] transpose: bool,
) {
    #[unroll]
    for j in 0..LANES {
        if comptime![transpose] {
            sh[off + j * row_vecs] = crate::kernels::lane_column::<N>(regs, j);
        } else {
            sh[off + j * row_vecs] = regs[j];
        }
    }
}

/// Where a unit's 4 × 4 block of an operand tile is read ([`load_block`]) and stored
/// ([`store_block`]).
#[derive(CubeType, Clone, Copy)]
struct Block {
    /// The first index along the strided dim, its length, and its stride in vectors.
    o0: usize,
    o_len: usize,
    so: usize,
    /// The element offset along the contiguous dim, and how far it moves per step along k.
    ci0: usize,
    ci_step: usize,
    /// The block's first vector in the tile's shared buffer.
    sh_off: usize,
}

/// Block `v` of an operand's tile along `t` (a's m, b's n: the tile's start `t0`, the dim's length
/// `t_len`, `tv` vectors a shared row; the operand's element strides along t and k), reduction
/// offset `k0` of `k_all`. `k_major`: the operand's vectors run along k (block `(t: v / 4, k:
/// v % 4)`, transposed into shared memory); else along t (block `(t: v % tv, k: v / tv)`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn block_of(
    v: usize,
    t0: usize,
    t_len: usize,
    tv: usize,
    t_stride: usize,
    k_stride: usize,
    k0: usize,
    k_all: usize,
    #[comptime] k_major: bool,
) -> Block {
    if comptime![k_major] {
        Block {
            o0: t0 + (v / 4) * 4,
            o_len: t_len,
            so: t_stride / LANES,
            ci0: k0 + (v % 4) * 4,
            ci_step: BK,
            sh_off: (v % 4) * 4 * tv + v / 4,
        }
    } else {
        Block {
            o0: k0 + (v / tv) * 4,
            o_len: k_all,
            so: k_stride / LANES,
            ci0: (t0 + (v % tv) * 4).min(t_len - 4),
            ci_step: 0,
            sh_off: (v / tv) * 4 * tv + v % tv,
        }
    }
}

/// `c[.., m, n] = Σ_k a[.., m, k]·b[.., k, n]` in f32 over batch dims (one matrix per `CUBE_POS_Z`;
/// a batch dim of 1 in a or b broadcasts). a is contiguous along k (`a_k_major`) or along m, b along
/// n (`b_n_major`) or along k; both are read in vectors of 4 (k a multiple of 16, the contiguous
/// dims and the other strides multiples of 4). Cube `(x, y)` writes rows `BM·y ..` and columns
/// `BN·x ..` (`BM = 64·bm_vecs`, `BN = 64·bn_vecs`): unit `(ty, tx) = (u / 16, u % 16)` rows
/// `g·64 + ty·4 + {0..4}` for `g < bm_vecs`, columns `h·64 + tx·4 + {0..4}` for `h < bn_vecs`,
/// written 4 at a time where n is a multiple of 4 (`vector_out`, `NO`), else one at a time. Units
/// `0..BM` stage a's tiles, units `128..128 + BN` b's.
#[cube(launch_unchecked)]
fn gemm_kernel<N: Size, NO: Size>(
    a: &Tensor<Vector<f32, N>>,
    b: &Tensor<Vector<f32, N>>,
    c: &mut Tensor<Vector<f32, NO>>,
    #[comptime] a_k_major: bool,
    #[comptime] b_n_major: bool,
    #[comptime] bm_vecs: usize,
    #[comptime] bn_vecs: usize,
    #[comptime] vector_out: bool,
) {
    let rank = a.rank();
    let m = a.shape(rank - 2);
    let n = b.shape(rank - 1);
    // c is `[splits, .., m, n]`: split s sums k in `s·k .. (s + 1)·k`.
    let splits = c.shape(0);
    let k_all = a.shape(rank - 1);
    let k = k_all / splits;
    let batches = CUBE_COUNT_Z as usize / splits;
    let split = CUBE_POS_Z as usize / batches;
    let k0 = split * k;
    // Batch offsets (elements) of this cube's matrices.
    let mut z = CUBE_POS_Z as usize % batches;
    let mut a_off = 0usize;
    let mut b_off = 0usize;
    let mut c_off = split * c.stride(0);
    let mut d = rank - 2;
    while d > 0 {
        d -= 1;
        let i = z % c.shape(d + 1);
        z /= c.shape(d + 1);
        // A batch dim of 1 broadcasts.
        a_off += select(a.shape(d) == 1, 0, i * a.stride(d));
        b_off += select(b.shape(d) == 1, 0, i * b.stride(d));
        c_off += i * c.stride(d + 1);
    }
    let a_base = a_off / LANES;
    let b_base = b_off / LANES;
    let bn = comptime!(64 * bn_vecs);
    let bnv = comptime!(16 * bn_vecs);
    let bm = comptime!(64 * bm_vecs);
    let bmv = comptime!(16 * bm_vecs);
    let m0 = CUBE_POS_Y as usize * bm;
    let n0 = CUBE_POS_X as usize * bn;
    let u = UNIT_POS_X as usize;

    // This unit's 4 × 4 block of the a or b tile (a's rows are m, b's columns n).
    let a_role = u < bm;
    let b_role = u >= 128 && u < 128 + bn;
    let v = u % 128;
    let (sam, sak) = (a.stride(rank - 2), a.stride(rank - 1));
    let (sbk, sbn) = (b.stride(rank - 2), b.stride(rank - 1));
    let pa = block_of(v, m0, m, bmv, sam, sak, k0, k_all, a_k_major);
    let pb = block_of(v, n0, n, bnv, sbn, sbk, k0, k_all, !b_n_major);
    let o0 = select(a_role, pa.o0, pb.o0);
    let o_len = select(a_role, pa.o_len, pb.o_len);
    let so = select(a_role, pa.so, pb.so);
    let ci0 = select(a_role, pa.ci0, pb.ci0);
    let ci_step = select(a_role, pa.ci_step, pb.ci_step);
    let sh_off = select(a_role, pa.sh_off, pb.sh_off);
    // Per step along k the block moves 16 along the contiguous dim (k-major) or the strided one.
    let o_step = BK - ci_step;

    let mut sa = Shared::<[Vector<f32, N>]>::new_slice(comptime!(2 * BK * 16 * bm_vecs));
    let mut sb = Shared::<[Vector<f32, N>]>::new_slice(comptime!(2 * BK * 16 * bn_vecs));
    let a_buf = comptime!(BK * 16 * bm_vecs);
    let b_buf = comptime!(BK * 16 * bn_vecs);
    let mut regs = Array::<Vector<f32, N>>::new(LANES);

    let steps = k / BK;
    if a_role {
        load_block::<N>(a, a_base, o0, o_len, so, ci0, &mut regs);
        store_block::<N>(&mut sa, sh_off, bmv, &regs, a_k_major);
    } else if b_role {
        load_block::<N>(b, b_base, o0, o_len, so, ci0, &mut regs);
        store_block::<N>(&mut sb, sh_off, bnv, &regs, !b_n_major);
    }
    sync_cube();

    let ty = u / 16;
    let tx = u % 16;
    let rows = comptime!(LANES * bm_vecs);
    let mut acc = Array::<Vector<f32, N>>::new(comptime!(rows * bn_vecs));
    #[unroll]
    for i in 0..rows * bn_vecs {
        acc[i] = Vector::new(0.0);
    }
    let mut bv = Array::<Vector<f32, N>>::new(bn_vecs);
    for s in 0..steps {
        let cur = s % 2;
        let more = s + 1 < steps;
        if more {
            let o = o0 + (s + 1) * o_step;
            let ci = ci0 + (s + 1) * ci_step;
            if a_role {
                load_block::<N>(a, a_base, o, o_len, so, ci, &mut regs);
            } else if b_role {
                load_block::<N>(b, b_base, o, o_len, so, ci, &mut regs);
            }
        }
        let sa0 = cur * a_buf;
        let sb0 = cur * b_buf;
        #[unroll]
        for kk in 0..BK {
            #[unroll]
            for h in 0..bn_vecs {
                bv[h] = sb[sb0 + kk * bnv + h * 16 + tx];
            }
            #[unroll]
            for g in 0..bm_vecs {
                let av = sa[sa0 + kk * bmv + g * 16 + ty];
                #[unroll]
                for i in 0..LANES {
                    let s = Vector::<f32, N>::new(av.extract(i));
                    #[unroll]
                    for h in 0..bn_vecs {
                        let t = (g * LANES + i) * bn_vecs + h;
                        acc[t] = fma(s, bv[h], acc[t]);
                    }
                }
            }
        }
        if more {
            let nxt = 1 - cur;
            if a_role {
                store_block::<N>(&mut sa, nxt * a_buf + sh_off, bmv, &regs, a_k_major);
            } else if b_role {
                store_block::<N>(&mut sb, nxt * b_buf + sh_off, bnv, &regs, !b_n_major);
            }
        }
        sync_cube();
    }

    // c is contiguous (allocated here): vectors of `NO` (4 where n is a multiple of 4, else 1).
    let scm = c.stride(rank - 1);
    #[unroll]
    for i in 0..rows {
        let row = m0 + (i / LANES) * 64 + ty * 4 + i % LANES;
        if row < m {
            #[unroll]
            for h in 0..bn_vecs {
                let v = acc[i * bn_vecs + h];
                let col = n0 + h * 64 + tx * 4;
                if comptime![vector_out] {
                    if col < n {
                        c[(c_off + row * scm + col) / LANES] = Vector::cast_from(v);
                    }
                } else {
                    #[unroll]
                    for e in 0..LANES {
                        if col + e < n {
                            c[c_off + row * scm + col + e] = Vector::new(v.extract(e));
                        }
                    }
                }
            }
        }
    }
}

/// Whether an operand `[.., rows, cols]` can be read in vectors of 4 along one of its last two
/// dims: `Some(true)` along cols, `Some(false)` along rows, `None` if neither.
fn vector_major(t: &CubeTensor) -> Option<bool> {
    let (shape, strides) = (&t.meta.shape, t.meta.strides());
    let r = shape.num_dims();
    let aligned = |skip: usize| {
        (0..r)
            .filter(|&d| d != skip)
            .all(|d| strides[d].is_multiple_of(LANES) || shape[d] == 1)
            && shape[skip].is_multiple_of(LANES)
    };
    let offset_ok = t
        .handle
        .offset_start
        .is_none_or(|o| o.is_multiple_of((LANES * 4) as u64));
    if !offset_ok {
        return None;
    }
    if strides[r - 1] == 1 && aligned(r - 1) {
        Some(true)
    } else if strides[r - 2] == 1 && aligned(r - 2) {
        Some(false)
    } else {
        None
    }
}

/// Shared memory the kernel needs for `64·bm_vecs × 64·bn_vecs` tiles (two buffers of each
/// operand's tile).
fn shared_bytes(bm_vecs: usize, bn_vecs: usize) -> usize {
    2 * BK * 64 * (bm_vecs + bn_vecs) * 4
}

/// The output tile `(64·bm_vecs, 64·bn_vecs)` for an `[m, n]` output over `batches` where `slots`
/// cubes run at once: the one with the least `waves · tile · cost`, where a smaller tile
/// costs more per output (more shared loads per multiply-add).
fn tile_shape(m: usize, n: usize, batches: usize, slots: usize) -> (usize, usize) {
    let cost = |(bm, bn, f): (usize, usize, f64)| {
        let cubes = m.div_ceil(64 * bm) * n.div_ceil(64 * bn) * batches;
        cubes.div_ceil(slots) as f64 * (bm * bn) as f64 * f
    };
    [(2, 2, 1.0), (2, 1, 1.15), (1, 2, 1.15), (1, 1, 1.4)]
        .into_iter()
        .min_by(|a, b| cost(*a).total_cmp(&cost(*b)))
        .map(|(bm, bn, _)| (bm, bn))
        .expect("candidates")
}

/// In how many parts to split a reduction of `k` over `cubes` output tiles where `slots` cubes run
/// at once: the power of two up to 16 (parts of at least 512, a multiple of 16) that needs the
/// fewest waves per unit of work, so that a small output with a long reduction (a weight's
/// gradient over 8192 tokens) fills the GPU. The parts' sum is one more pass over `parts` outputs.
fn k_splits(cubes: usize, k: usize, slots: usize) -> usize {
    let cost = |s: usize| (cubes * s).div_ceil(slots) as f64 / s as f64;
    [1, 2, 4, 8, 16]
        .into_iter()
        .filter(|&s| k.is_multiple_of(BK * s) && k / s >= 512)
        .fold(
            1,
            |best, s| if cost(s) < cost(best) * 0.9 { s } else { best },
        )
}

/// Whether `[.., m, k] · [.., k, n]` suits [`gemm_kernel`] by its output: at least 16 rows and
/// columns. Thinner outputs (LoRA's `[r, d]` gradients at r 8) would leave most of its smallest
/// tile (64 × 64) idle: through it, the f32 LoRA attn+mlp step took 247 ms against 185 ms with
/// Burn's matmul for them (H100). The rest of [`try_gemm`]'s conditions are checked there.
pub fn suits(lhs: &Shape, rhs: &Shape) -> bool {
    let r = lhs.num_dims();
    r >= 2 && rhs.num_dims() == r && lhs[r - 2].min(rhs[r - 1]) >= 16
}

/// Cubes along x and y (and batches along z) at most.
const MAX_GRID: usize = 65_535;

/// `lhs [.., m, k] · rhs [.., k, n]` with [`gemm_kernel`], or `None` where it does not apply (not
/// f32, batch dims that do not broadcast, k not a multiple of 16, an operand that cannot be read in vectors, a
/// grid or shared memory too large).
pub fn try_gemm(lhs: &CubeTensor, rhs: &CubeTensor) -> Option<CubeTensor> {
    let (ls, rs) = (&lhs.meta.shape, &rhs.meta.shape);
    let r = ls.num_dims();
    if lhs.dtype != DType::F32
        || rhs.dtype != DType::F32
        || r < 2
        || rs.num_dims() != r
        || ls[r - 1] != rs[r - 2]
    {
        return None;
    }
    let batch = broadcast(&ls[..r - 2], &rs[..r - 2])?;
    let (m, k, n) = (ls[r - 2], ls[r - 1], rs[r - 1]);
    let batches = batch.iter().product::<usize>();
    if m == 0 || n == 0 || k == 0 || !k.is_multiple_of(BK) || batches > MAX_GRID {
        return None;
    }
    let a_k_major = vector_major(lhs)?;
    let b_n_major = vector_major(rhs)?;
    let props = lhs.client.properties();
    let sms = props.hardware.num_streaming_multiprocessors.unwrap_or(1) as usize;
    let (bm_vecs, bn_vecs) = tile_shape(m, n, batches, 2 * sms);
    if shared_bytes(bm_vecs, bn_vecs) > props.hardware.max_shared_memory_size
        || (UNITS as u32) > props.hardware.max_units_per_cube
    {
        return None;
    }
    let (gx, gy) = (n.div_ceil(64 * bn_vecs), m.div_ceil(64 * bm_vecs));
    let splits = k_splits(gx * gy * batches, k, 2 * sms);
    if gx > MAX_GRID || gy > MAX_GRID || batches * splits > MAX_GRID {
        return None;
    }
    let mut dims = vec![splits];
    dims.extend_from_slice(&batch);
    dims.extend([m, n]);
    let out = empty_device_contiguous_dtype(
        lhs.client.clone(),
        lhs.device.clone(),
        Shape::from(dims),
        DType::F32,
    );
    let vector_out = n.is_multiple_of(LANES);
    // Safety: loads clamp rows and columns into the operands (k is a multiple of 16 · splits,
    // every vector offset in bounds), stores check `row < m`, `col < n`.
    unsafe {
        gemm_kernel::launch_unchecked(
            &lhs.client,
            CubeCount::Static(gx as u32, gy as u32, (batches * splits) as u32),
            CubeDim::new_1d(UNITS as u32),
            LANES,
            if vector_out { LANES } else { 1 },
            lhs.clone().into_tensor_arg(),
            rhs.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            a_k_major,
            b_n_major,
            bm_vecs,
            bn_vecs,
            vector_out,
        );
    }
    let out = match splits {
        1 => out,
        _ => CubeBackend::float_sum_dim(out, 0),
    };
    let mut dims = batch;
    dims.extend([m, n]);
    let out = CubeBackend::float_reshape(out, Shape::from(dims));
    Some(out)
}

/// Batch dims as Burn's matmul broadcasts them (equal, or 1 on one side), `None` where they clash.
fn broadcast(lhs: &[usize], rhs: &[usize]) -> Option<Vec<usize>> {
    let each = |(&l, &r): (&usize, &usize)| (l == r || l == 1 || r == 1).then_some(l.max(r));
    lhs.iter().zip(rhs).map(each).collect()
}

/// `[.., m, k] · [.., k, n]`: the shape of the product (batch dims broadcast).
fn product_spec(lhs: &TensorSpec, rhs: &TensorSpec) -> TensorSpec {
    let r = lhs.shape.num_dims();
    let batch = broadcast(&lhs.shape[..r - 2], &rhs.shape[..r - 2]).expect("matmul: batch dims");
    let dims = [&batch[..], &[lhs.shape[r - 2], rhs.shape[r - 1]]].concat();
    TensorSpec::new(Shape::from(dims), lhs.dtype)
}

/// `lhs [.., m, k] · rhs [.., k, n]` on a cubecl device (not autodiff): [`GemmKernels::gemm`].
pub fn product<const D: usize>(
    lhs: burn::tensor::Tensor<D>,
    rhs: burn::tensor::Tensor<D>,
) -> burn::tensor::Tensor<D> {
    use burn::backend::Dispatch;
    burn::tensor::Tensor::from_dispatch(<Dispatch as GemmKernels>::gemm(
        lhs.into_dispatch(),
        rhs.into_dispatch(),
    ))
}

/// The product as an op of its own on cubecl devices, so that fusion hands it real tensors.
#[backend_extension(Cube, Fusion)]
pub trait GemmKernels: Backend {
    /// `[.., m, k] · [.., k, n] -> [.., m, n]`: [`gemm_kernel`] (f32) or
    /// [`crate::coopmat::try_coopmat`] (f16) where they apply, else Burn's matmul.
    #[fusion(meta = |lhs, rhs| product_spec(lhs, rhs))]
    fn gemm(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl GemmKernels for CubeBackend {
    fn gemm(lhs: CubeTensor, rhs: CubeTensor) -> CubeTensor {
        try_gemm(&lhs, &rhs)
            .or_else(|| crate::coopmat::try_coopmat(&lhs, &rhs))
            .unwrap_or_else(|| CubeBackend::float_matmul(lhs, rhs))
    }
}
