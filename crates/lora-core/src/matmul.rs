//! Matrix products whose output flex writes straight into fresh memory.
//!
//! Flex allocates each product's output zero-filled and then copies it once more (its
//! `FlexTensor::empty` hands a `vec![0u8; n]` to `Bytes::from_bytes_vec`, which re-allocates byte
//! vectors to 16-byte alignment): a memset and a memcpy per product, ~11 % of a minGPT sort step.
//! [`Matmul::mm`] runs the same `gemm` kernels with Flex's parallel rules into an uninitialised
//! `Vec<f32>`; [`matmul`] is the 2-D product as an autodiff op whose backward products are
//! [`Matmul::mm`]s too (Burn's matmul node would call Flex's). On cubecl, f32 products run
//! [`crate::gemm`]'s kernel (2–2.5× Burn's unit kernels on an H100); other dtypes run Burn's
//! matmul. A weight gradient with a thin side (LoRA's `[r, d]`) is one pass of
//! [`crate::kernels::AdapterKernels::thin_tn`], other small outputs are split over their rows
//! ([`Matmul::mm_tn`]), so that the reduction keeps the GPU busy. NdArray: Burn's.

#![allow(deprecated)] // `NdArray`: deprecated upstream, still one of our backends.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, Dispatch, Flex, NdArray, backend_extension};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use rayon::prelude::*;

use crate::gemm::GemmKernels;
use crate::kernels::{AdapterKernels, THIN_MAX};

/// `lhs · rhs` on a backend.
pub trait Matmul: Backend {
    /// `[..., m, k] · [..., k, n] -> [..., m, n]`, Burn's broadcasting rules.
    fn mm(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// `xᵀ · dy`: x `[rows, m]`, dy `[rows, n]` -> `[m, n]` (a weight's gradient).
    fn mm_tn(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::mm(Self::float_transpose(x), dy)
    }
}

impl Matmul for Cube {
    /// f32 products that suit [`crate::gemm`]'s kernel and f16 ones that suit
    /// [`crate::coopmat`]'s as [`GemmKernels::gemm`] (which still falls back to Burn's matmul where
    /// the kernel cannot run); the rest is Burn's matmul.
    fn mm(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let ours = match (lhs.dtype(), rhs.dtype()) {
            (DType::F32, DType::F32) => crate::gemm::suits(&lhs.shape(), &rhs.shape()),
            (DType::F16, DType::F16) => crate::coopmat::suits(&lhs.shape(), &rhs.shape()),
            _ => false,
        };
        if ours {
            return <Self as GemmKernels>::gemm(lhs, rhs);
        }
        Self::float_matmul(lhs, rhs)
    }

    /// A thin x `[rows, m ≤ 16]` over many rows (LoRA's `[r, n]` gradients over thousands of
    /// tokens): [`AdapterKernels::thin_tn`], one pass over dy. Other outputs too small to fill a
    /// GPU: split over the rows, `parts` products of `rows / parts` rows as one batched matmul, then
    /// their sum. Larger outputs: one [`Self::mm`] (in f32 its kernel splits a long reduction
    /// itself).
    fn mm_tn(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        let ([rows, m], n) = (x.shape().dims::<2>(), dy.shape()[1]);
        if m <= THIN_MAX && rows >= THIN_FROM_ROWS && x.dtype() == dy.dtype() {
            return <Self as AdapterKernels>::thin_tn(x, dy);
        }
        let parts = split_k_parts(rows, m * n);
        if parts == 1 {
            return Self::mm(Self::float_transpose(x), dy);
        }
        let k = rows / parts;
        let x = Self::float_reshape(x, Shape::new([parts, k, m]));
        let dy = Self::float_reshape(dy, Shape::new([parts, k, n]));
        sum_of_products::<Self>(Self::float_swap_dims(x, 1, 2), dy, [m, n])
    }
}

/// `Σₛ lhs[s]·rhs[s]`: lhs `[parts, m, k]`, rhs `[parts, k, n]` -> `[m, n]` (`out`), the parts of a
/// product split along its reduction run as one batched [`Matmul::mm`], then summed.
pub fn sum_of_products<B: Matmul>(
    lhs: FloatTensor<B>,
    rhs: FloatTensor<B>,
    out: [usize; 2],
) -> FloatTensor<B> {
    let parts = B::mm(lhs, rhs);
    B::float_reshape(B::float_sum_dim(parts, 0), Shape::new(out))
}

/// From how many rows [`Matmul::mm_tn`] on cubecl computes a thin `xᵀ·dy` (x `[rows, m ≤ 16]`: LoRA's
/// gradients) with [`AdapterKernels::thin_tn`], one pass over dy, rather than a split batched matmul.
pub(crate) const THIN_FROM_ROWS: usize = 512;

/// Outputs below this many elements get their reduction split on a GPU (a 64 × 64 tile each is 16
/// tiles; an H100 has 132 SMs).
const SPLIT_K_OUTPUT: usize = 1 << 16;

/// In how many parts [`Matmul::mm_tn`] on cubecl splits `rows`: 1 where the output (`out`
/// elements) fills the GPU or the rows are few, else up to 32 equal parts of at least 256 rows.
fn split_k_parts(rows: usize, out: usize) -> usize {
    if out >= SPLIT_K_OUTPUT {
        return 1;
    }
    (1..=5)
        .map(|p| 1 << p)
        .filter(|&p| rows.is_multiple_of(p) && rows / p >= 256)
        .max()
        .unwrap_or(1)
}
impl Matmul for NdArray {}
/// Burn's matmul on whichever device (for code written against tensors rather than a backend).
impl Matmul for Dispatch {}

impl Matmul for Flex {
    fn mm(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let (ls, rs) = (lhs.shape(), rhs.shape());
        let r = ls.num_dims();
        // f32 with equal batch dims (every product here); the rest is Flex's.
        if lhs.dtype() != DType::F32
            || rhs.dtype() != DType::F32
            || r < 2
            || rs.num_dims() != r
            || ls[..r - 2] != rs[..r - 2]
            || ls[r - 1] != rs[r - 2]
        {
            return Self::float_matmul(lhs, rhs);
        }
        flex_mm(&lhs, &rhs)
    }
}

/// Flex's `matmul` thresholds, in multiply-adds: one product, and a batch of them in all.
const PARALLEL: usize = 192 * 192 * 192;
const BATCH_PARALLEL: usize = 128 * 128 * 128;

fn flex_mm(lhs: &FloatTensor<Flex>, rhs: &FloatTensor<Flex>) -> FloatTensor<Flex> {
    let (ll, rl) = (lhs.layout(), rhs.layout());
    let r = ll.num_dims();
    let (m, k, n) = (ll.shape()[r - 2], ll.shape()[r - 1], rl.shape()[r - 1]);
    let batch = &ll.shape()[..r - 2];
    let count = batch.iter().product::<usize>();
    let mut dims = batch.to_vec();
    dims.extend([m, n]);
    let size = m * n;
    if size * count == 0 || k == 0 {
        return Flex::float_from_data(
            TensorData::new(vec![0f32; size * count], dims),
            &Default::default(),
        );
    }
    // Element offset of matrix `b` (row-major over the batch dims) in a layout.
    let offset = |start: usize, strides: &[isize], mut b: usize| {
        let mut off = start as isize;
        for i in (0..r - 2).rev() {
            off += (b % batch[i]) as isize * strides[i];
            b /= batch[i];
        }
        off
    };
    let (lhs_data, rhs_data) = (lhs.storage::<f32>(), rhs.storage::<f32>());
    let (lrs, lcs) = (ll.strides()[r - 2], ll.strides()[r - 1]);
    let (rrs, rcs) = (rl.strides()[r - 2], rl.strides()[r - 1]);
    let run = |b: usize, out: &mut [std::mem::MaybeUninit<f32>], par: gemm::Parallelism| {
        // SAFETY: the offsets and strides are the layouts' own, inside their storage; `out` holds
        // `m·n` elements, written and not read (`read_dst` false).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr() as *mut f32,
                1,
                n as isize,
                false,
                lhs_data
                    .as_ptr()
                    .offset(offset(ll.start_offset(), ll.strides(), b)),
                lcs,
                lrs,
                rhs_data
                    .as_ptr()
                    .offset(offset(rl.start_offset(), rl.strides(), b)),
                rcs,
                rrs,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    };
    // Flex's rules: one product on several threads from `PARALLEL`, unless a batch of at least four
    // is worth splitting instead; a batch split across threads from `BATCH_PARALLEL` in all.
    let batch_parallel = count > 1 && size * k * count >= BATCH_PARALLEL;
    let per_product = size * k >= PARALLEL && !(batch_parallel && count >= 4);
    let mut out = Vec::<f32>::with_capacity(size * count);
    let spare = &mut out.spare_capacity_mut()[..size * count];
    if batch_parallel && !per_product {
        let each = |(b, o)| run(b, o, gemm::Parallelism::None);
        spare.par_chunks_mut(size).enumerate().for_each(each);
    } else {
        let par = match per_product {
            true => gemm::Parallelism::Rayon(0),
            false => gemm::Parallelism::None,
        };
        spare
            .chunks_mut(size)
            .enumerate()
            .for_each(|(b, o)| run(b, o, par));
    }
    // SAFETY: every matrix of the output was written above.
    unsafe { out.set_len(size * count) };
    Flex::float_from_data(TensorData::new(out, Shape::from(dims)), &Default::default())
}

/// The 2-D product as one autodiff op.
#[backend_extension(Cube, Flex, NdArray, Autodiff)]
pub trait MatmulKernels: Backend {
    /// `x [rows, d_in] · w [d_in, d_out] -> [rows, d_out]`.
    fn matmul2(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
}

macro_rules! plain_backend {
    ($($b:ty),*) => {$(
        impl MatmulKernels for $b {
            fn matmul2(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
                Self::mm(x, w)
            }
        }
    )*};
}

plain_backend!(Cube, Flex, NdArray);

#[derive(Debug)]
struct Matmul2Backward;

impl<B: Matmul> Backward<B, 2> for Matmul2Backward {
    /// x where w's gradient is asked for, w where x's is.
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state;
        if let (Some(node), Some(w)) = (node_x, w) {
            grads.register::<B>(node.id, B::mm(dy.clone(), B::float_transpose(w)));
        }
        if let (Some(node), Some(x)) = (node_w, x) {
            grads.register::<B>(node.id, B::mm_tn(x, dy));
        }
    }
}

impl<B: Matmul, C: CheckpointStrategy> MatmulKernels for Autodiff<B, C> {
    fn matmul2(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let (grad_x, grad_w) = (x.is_tracked(), w.is_tracked());
        let prep = Matmul2Backward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful();
        let (x, w) = (x.into_primitive(), w.into_primitive());
        let out = B::mm(x.clone(), w.clone());
        match prep {
            // Keep only what the gradients need: a frozen W's product keeps no activation.
            OpsKind::Tracked(prep) => prep.finish((grad_w.then_some(x), grad_x.then_some(w)), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// `x [rows, d_in] · w [d_in, d_out] -> [rows, d_out]` ([`MatmulKernels::matmul2`]).
pub fn matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as MatmulKernels>::matmul2(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}
