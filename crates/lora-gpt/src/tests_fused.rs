//! The fused ops against the composed Burn ops they replace: values and gradients.

use crate::fused::{
    AttentionDropout, VocabSlices, causal_attention_in_blocks, gelu_tanh, hashed_mask_values,
    head_grads_in_slices, layer_norm, linear_cross_entropy_in_chunks,
};
use crate::mingpt::cross_entropy_ignore;
use burn::tensor::activation::{log_softmax, sigmoid, softmax};
use burn::tensor::{Bool, DType, Device, Distribution, Int, Tensor, TensorData};

fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

/// Attention as `CausalSelfAttention` wrote it before the fused op.
fn composed(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    keep: Option<Tensor<4>>,
    s: f64,
) -> Tensor<4> {
    let [b, h, t, _] = q.dims();
    let mask = Tensor::<2, Bool>::tril_mask([t, t], 0, &q.device())
        .unsqueeze::<4>()
        .expand([b, h, t, t]);
    let att = softmax(
        q.matmul(k.swap_dims(2, 3))
            .mul_scalar(s)
            .mask_fill(mask, f32::NEG_INFINITY),
        3,
    );
    let att = match keep {
        Some(m) => att * m,
        None => att,
    };
    att.matmul(v)
}

/// The attention dropout of [`attention_case`].
#[derive(Clone, Copy, Debug)]
enum Drop {
    No,
    /// A mask made outside the op.
    Mask,
    /// Hashed dropout: the reference multiplies by the mask [`hashed_mask_values`] makes on the
    /// host, the op draws it from the seed (in the kernels on cubecl).
    Hashed,
}

/// `[b, h, t]` `[2, 3, 19]`: the backward pass keeps the dropout mask as it is (few scores, not a
/// multiple of 16); `[8, 8, 32]`: packed to bits (65,536 scores). The op in `blocks` query blocks
/// (none: the backend's choice), the reference in one: the same values and the same dropout.
fn attention_case(
    device: &Device,
    dropout: Drop,
    [b, h, t]: [usize; 3],
    blocks: Option<usize>,
    tol: f32,
) {
    attention_case_d(device, dropout, [b, h, t, 4], blocks, tol)
}

/// [`attention_case`] with heads of `d`: 64 runs cubecl's one-kernel attention (`flash.rs`).
fn attention_case_d(
    device: &Device,
    dropout: Drop,
    [b, h, t, d]: [usize; 4],
    blocks: Option<usize>,
    tol: f32,
) {
    device.seed(7);
    let qkv = Tensor::<3>::random([b, t, 3 * h * d], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), device);
    let (keep, fused_keep) = match dropout {
        Drop::No => (None, None),
        Drop::Mask => {
            let m = Tensor::<4>::random([b, h, t, t], Distribution::Bernoulli(0.7), device)
                .mul_scalar(1.0 / 0.7);
            (Some(m.clone()), Some(AttentionDropout::Mask(m, 0.7)))
        }
        Drop::Hashed => {
            let seed = Tensor::<1>::random([2], Distribution::Default, device);
            let u = seed.to_data().iter::<f32>().collect::<Vec<_>>();
            let m = hashed_mask_values([u[0], u[1]], b * h * t, t, 0.7);
            let m = Tensor::<4>::from_data(TensorData::new(m, [b, h, t, t]), device);
            (Some(m), Some(AttentionDropout::Hashed(seed, 0.7)))
        }
    };
    let bias = Tensor::<2>::zeros([t, t], device)
        .mask_fill(
            Tensor::<2, Bool>::tril_mask([t, t], 0, device),
            f32::NEG_INFINITY,
        )
        .reshape([1, 1, t, t]);
    let s = 0.5;
    // q, k, v as `CausalSelfAttention` split them before the fused op.
    let split = |qkv: Tensor<3>| {
        let mut heads = qkv
            .chunk(3, 2)
            .into_iter()
            .map(|z| z.reshape([b, t, h, d]).swap_dims(1, 2));
        let mut next = || heads.next().unwrap();
        (next(), next(), next())
    };
    let run = |fused: bool| {
        let qkv = qkv.clone().require_grad();
        let y = if fused {
            causal_attention_in_blocks(qkv.clone(), bias.clone(), fused_keep.clone(), h, s, blocks)
        } else {
            let (q, k, v) = split(qkv.clone());
            composed(q, k, v, keep.clone(), s)
        };
        let grads = (y.clone() * w.clone()).sum().backward();
        (y, qkv.grad(&grads).expect("a gradient"))
    };
    let (y0, g0) = run(false);
    let (y1, g1) = run(true);
    let what = format!("{device:?}, dropout {dropout:?}, {blocks:?} blocks");
    // Flex's softmax sums each row in sixteen lanes, the composed one in Flex's order.
    let diff = max_diff(y0, y1);
    assert!(diff < tol, "output {diff}, {what}");
    let scale = g0.clone().abs().max().into_scalar::<f32>();
    let diff = max_diff(g0, g1);
    assert!(diff <= tol * scale.max(1.0), "grad qkv: {diff}, {what}");
    // Without autodiff: the plain backend op, same values.
    let plain = device.clone().without_autodiff();
    let qkv = Tensor::<3>::from_data(qkv.to_data(), &plain);
    let to = |x: &Tensor<4>| Tensor::<4>::from_data(x.to_data(), &plain);
    let plain_keep = fused_keep.map(|k| match k {
        AttentionDropout::Mask(m, p) => AttentionDropout::Mask(to(&m), p),
        AttentionDropout::Hashed(seed, p) => {
            AttentionDropout::Hashed(Tensor::from_data(seed.to_data(), &plain), p)
        }
    });
    let y2 = causal_attention_in_blocks(
        qkv.clone(),
        Tensor::from_data(bias.to_data(), &plain),
        plain_keep,
        h,
        s,
        blocks,
    );
    let (q, k, v) = split(qkv);
    let y3 = composed(q, k, v, keep.as_ref().map(to), s);
    assert!(max_diff(y2, y3) < tol, "plain output, {what}");
}

/// The head + loss op's input gradient as a sum over vocabulary slices: `d·wᵀ`.
/// The head's gradients over vocabulary slices (as on GPUs) against `d·wᵀ` and `hᵀ·d`: slices
/// that pad the vocabulary and slices that do not, and GPT-2's.
fn head_slices_case(device: &Device, tol: f32) {
    device.seed(5);
    let (rows, k) = (10, 6);
    assert_eq!(VocabSlices::of(50257), Some(VocabSlices { s: 8, kp: 6288 }));
    assert_eq!(VocabSlices::of(1023), None);
    for (v, sl) in [
        (20, VocabSlices { s: 3, kp: 8 }),
        (24, VocabSlices { s: 3, kp: 8 }),
        (1031, VocabSlices::of(1031).unwrap()),
    ] {
        let d = Tensor::<2>::random([rows, v], Distribution::Normal(0.0, 1.0), device);
        let h = Tensor::<2>::random([rows, k], Distribution::Normal(0.0, 1.0), device);
        let w = Tensor::<2>::random([k, v], Distribution::Normal(0.0, 1.0), device);
        let (dh, dw) = head_grads_in_slices(d.clone(), h.clone(), w.clone(), sl);
        // Relative to the largest value (sums over v terms).
        let rel = |a: Tensor<2>, b: Tensor<2>| {
            let scale = a.clone().abs().max().into_scalar::<f32>();
            max_diff(a, b) / scale
        };
        let diff = rel(d.clone().matmul(w.transpose()), dh);
        assert!(diff < tol, "d·wᵀ {diff}, v {v}, {device:?}");
        let diff = rel(h.transpose().matmul(d), dw);
        assert!(diff < tol, "hᵀ·d {diff}, v {v}, {device:?}");
    }
}

fn nll_case(device: &Device, tol: f32) {
    device.seed(3);
    let (b, t, v) = (2, 5, 11);
    let logits = Tensor::<3>::random([b, t, v], Distribution::Normal(0.0, 3.0), device);
    let targets = Tensor::<2, Int>::from_data(
        TensorData::new(vec![0i64, 3, -1, 10, 7, -1, 2, 2, 9, 1], [b, t]),
        device,
    );
    let run = |fused: bool| {
        let x = logits.clone().require_grad();
        let loss = if fused {
            cross_entropy_ignore(x.clone(), targets.clone())
        } else {
            // As `cross_entropy_ignore` wrote it before the fused op.
            let tg = targets.clone().reshape([b * t]);
            let keep = tg.clone().greater_equal_elem(0).float();
            let logp = log_softmax(x.clone().reshape([b * t, v]), 1);
            let picked = logp
                .gather(1, tg.clamp_min(0).reshape([b * t, 1]))
                .reshape([b * t]);
            (picked * keep.clone()).sum().neg() / keep.sum()
        };
        let grads = loss.clone().backward();
        (loss, x.grad(&grads).expect("a gradient"))
    };
    let (l0, g0) = run(false);
    let (l1, g1) = run(true);
    assert!(max_diff(l0, l1) < tol, "loss, {device:?}");
    assert!(max_diff(g0, g1) < tol, "logit grads, {device:?}");
}

/// The head + loss op against `cross_entropy_ignore(h·w)`: value and the gradients w.r.t. h and
/// w (trained, as in full fine-tuning, or frozen, as with LoRA), in one chunk and in several;
/// `v` the vocabulary (from 1024, cubecl runs the rows kernel of `kernels.rs`).
fn linear_ce_case(device: &Device, v: usize, tol: f32) {
    device.seed(4);
    let (n, d) = (10, 6);
    let h = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<2>::random([d, v], Distribution::Normal(0.0, 1.0), device);
    let tg = vec![0i64, 3, -1, 12, 7, -1, 2, 2, 9, 1];
    let targets = Tensor::<1, Int>::from_data(TensorData::new(tg, [n]), device);
    for rows in [n, 3] {
        for train_w in [true, false] {
            let run = |fused: bool| {
                let h = h.clone().require_grad();
                let w = if train_w {
                    w.clone().require_grad()
                } else {
                    w.clone()
                };
                let loss = if fused {
                    linear_cross_entropy_in_chunks(h.clone(), w.clone(), targets.clone(), rows, 1.0)
                } else {
                    let logits = h.clone().matmul(w.clone()).reshape([1, n, v]);
                    cross_entropy_ignore(logits, targets.clone().reshape([1, n]))
                };
                // A scaled loss, as gradient accumulation divides it.
                let grads = loss.clone().mul_scalar(0.5).backward();
                let gw = train_w.then(|| w.grad(&grads).expect("w's gradient"));
                (loss, h.grad(&grads).expect("h's gradient"), gw)
            };
            let (l0, h0, w0) = run(false);
            let (l1, h1, w1) = run(true);
            let what = format!("rows {rows}, train w {train_w}, {device:?}");
            assert!(
                max_diff(l0.clone(), l1.clone()) < tol,
                "loss, {what}: {} vs {}",
                l0,
                l1
            );
            assert!(max_diff(h0, h1) < tol, "h grads, {what}");
            if let (Some(a), Some(b)) = (w0, w1) {
                assert!(max_diff(a, b) < tol, "w grads, {what}");
            }
        }
    }
    // Off the autodiff device: the value alone.
    let plain = device.clone().inner();
    let to = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &plain);
    let tp = Tensor::<1, Int>::from_data(targets.to_data(), &plain);
    let l0 = cross_entropy_ignore(
        to(&h).matmul(to(&w)).reshape([1, n, v]),
        tp.clone().reshape([1, n]),
    );
    let l1 = linear_cross_entropy_in_chunks(to(&h), to(&w), tp, 4, 1.0);
    assert!(max_diff(l0, l1) < tol, "plain loss, {device:?}");
}

fn gelu_case(device: &Device, tol: f32) {
    device.seed(5);
    let x = Tensor::<3>::random([2, 3, 50], Distribution::Normal(0.0, 3.0), device);
    let w = Tensor::<3>::random([2, 3, 50], Distribution::Normal(0.0, 1.0), device);
    let run = |fused: bool| {
        let x = x.clone().require_grad();
        let y = if fused {
            gelu_tanh(x.clone())
        } else {
            // As `new_gelu` wrote it before the fused op.
            let c = 2.0 * (2.0 / std::f64::consts::PI).sqrt();
            let x3 = x.clone() * x.clone() * x.clone();
            x.clone() * sigmoid((x.clone() + x3.mul_scalar(0.044715)).mul_scalar(c))
        };
        let grads = (y.clone() * w.clone()).sum().backward();
        (y, x.grad(&grads).expect("a gradient"))
    };
    let (y0, g0) = run(false);
    let (y1, g1) = run(true);
    // The same ops on the CPU backends: identical values.
    let exact = device.identity().is_none();
    let diff = max_diff(y0, y1);
    assert!(
        if exact { diff == 0.0 } else { diff < tol },
        "gelu values {diff}, {device:?}"
    );
    assert!(max_diff(g0, g1) < tol, "gelu grads, {device:?}");
}

/// The fused LayerNorm against Burn's (its composed ops on every backend): values and the
/// gradients of x, gamma and beta. `d` 50 (fewer columns than a cube's units) and 300 (more).
fn layer_norm_case(device: &Device, d: usize, tol: f32) {
    device.seed(9);
    let shape = [2, 7, d];
    let x = Tensor::<3>::random(shape, Distribution::Normal(0.5, 2.0), device);
    let w = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.5), device);
    let beta = Tensor::<1>::random([d], Distribution::Normal(0.0, 0.5), device);
    let run = |fused: bool| {
        let (x, g, b) = (
            x.clone().require_grad(),
            gamma.clone().require_grad(),
            beta.clone().require_grad(),
        );
        let y = match fused {
            true => layer_norm(x.clone(), g.clone(), b.clone(), 1e-5),
            false => burn::tensor::module::layer_norm(x.clone(), g.clone(), Some(b.clone()), 1e-5),
        };
        let grads = (y.clone() * w.clone()).sum().backward();
        let grad = |t: &Tensor<1>| t.grad(&grads).expect("a gradient");
        (y, x.grad(&grads).expect("x's gradient"), grad(&g), grad(&b))
    };
    let (y0, gx0, gg0, gb0) = run(false);
    let (y1, gx1, gg1, gb1) = run(true);
    let what = format!("{device:?}, d {d}");
    let diffs = [
        max_diff(y0, y1),
        max_diff(gx0, gx1),
        max_diff(gg0, gg1),
        max_diff(gb0, gb1),
    ];
    // gamma and beta: sums over 14 rows.
    let ok = diffs[0] < tol && diffs[1] < tol && diffs[2] < 10.0 * tol && diffs[3] < 10.0 * tol;
    assert!(
        ok,
        "layer norm: |Δ| value, x, gamma, beta grads {diffs:?}, {what}"
    );
}

fn devices() -> Vec<Device> {
    #[allow(deprecated)]
    let ndarray = Device::ndarray();
    vec![Device::flex(), ndarray]
}

#[test]
fn fused_attention_is_the_composed_attention() {
    for d in devices() {
        for shape in [[2, 3, 19], [8, 8, 32]] {
            attention_case(&d.clone().autodiff(), Drop::Mask, shape, None, 1e-5);
            attention_case(&d.clone().autodiff(), Drop::Hashed, shape, None, 1e-5);
        }
        attention_case(&d.clone().autodiff(), Drop::No, [2, 3, 19], None, 1e-5);
        // Query blocks (GPUs' attention): 19 in 6, 6, 7; 32 in 4 of 8.
        attention_case(
            &d.clone().autodiff(),
            Drop::Hashed,
            [2, 3, 19],
            Some(3),
            1e-5,
        );
        attention_case(&d.clone().autodiff(), Drop::No, [2, 3, 19], Some(3), 1e-5);
        attention_case(&d.autodiff(), Drop::Hashed, [8, 8, 32], Some(4), 1e-5);
    }
}

#[test]
fn fused_nll_is_log_softmax_cross_entropy() {
    for d in devices() {
        nll_case(&d.autodiff(), 1e-6);
    }
}

#[test]
fn fused_linear_cross_entropy_is_head_then_cross_entropy() {
    for d in devices() {
        linear_ce_case(&d.clone().autodiff(), 13, 1e-5);
        head_slices_case(&d, 1e-5);
    }
}

#[test]
fn fused_gelu_is_the_composed_gelu() {
    for d in devices() {
        gelu_case(&d.autodiff(), 1e-5);
    }
}

#[test]
fn fused_layer_norm_is_burns_layer_norm() {
    for d in devices() {
        layer_norm_case(&d.clone().autodiff(), 50, 1e-5);
        layer_norm_case(&d.autodiff(), 300, 1e-5);
    }
}

#[test]
fn fused_ops_on_wgpu() {
    let _one = crate::WGPU.lock();
    // CPU-only machines run this through Mesa's llvmpipe.
    let d = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice).autodiff();
    attention_case(&d, Drop::Mask, [2, 3, 19], None, 1e-4);
    attention_case(&d, Drop::Mask, [8, 8, 32], None, 1e-4);
    attention_case(&d, Drop::No, [8, 8, 32], None, 1e-4);
    // The mask drawn in the kernels equals the host's, bit for bit (else far off).
    attention_case(&d, Drop::Hashed, [2, 3, 19], None, 1e-4);
    attention_case(&d, Drop::Hashed, [8, 8, 32], None, 1e-4);
    // Query blocks: the kernels' rows of the bias and the mask's rows follow the block.
    attention_case(&d, Drop::Hashed, [2, 3, 19], Some(3), 1e-4);
    attention_case(&d, Drop::No, [2, 3, 19], Some(3), 1e-4);
    attention_case(&d, Drop::Hashed, [8, 8, 32], Some(4), 1e-4);
    // Rows of 150 and 300 scores: the softmax kernels' cubes of 64 and 128 units.
    attention_case(&d, Drop::Hashed, [1, 2, 300], Some(2), 1e-4);
    nll_case(&d, 1e-4);
    linear_ce_case(&d, 13, 1e-4);
    // 1031: the gradients over vocabulary slices, written by the rows kernel.
    linear_ce_case(&d, 1031, 1e-4);
    head_slices_case(&d, 1e-4);
    gelu_case(&d, 1e-4);
    // The LayerNorm row kernels.
    layer_norm_case(&d, 50, 1e-4);
    layer_norm_case(&d, 300, 1e-4);
    // LayerNorm + LoRA: A's gradient draws ln(x) and its dropout again as the forward pass's
    // kernels drew them, in one kernel from 512 rows (600), else Burn's ops (18); W's gradient
    // through the norm's kernel and the adapter's down kernel.
    for t in [9, 300] {
        for (keep, train_base) in [(1.0, false), (0.9, false), (0.9, true)] {
            norm_lora_case(&d, DType::F32, t, keep, train_base, 1e-4);
        }
    }
}

/// Heads of 64: cubecl's one-kernel attention forward (`flash.rs`), queries in tiles of 64 (150:
/// the last one partly past the sequence), the mask drawn as the softmax kernels draw it; with a
/// mask tensor, the query blocks.
#[test]
fn flash_attention_on_wgpu() {
    let _one = crate::WGPU.lock();
    let d = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice).autodiff();
    attention_case_d(&d, Drop::Hashed, [1, 2, 150, 64], None, 1e-4);
    attention_case_d(&d, Drop::No, [2, 3, 64, 64], None, 1e-4);
    attention_case_d(&d, Drop::Mask, [1, 2, 70, 64], None, 1e-4);
}

/// The causal bias `[1, 1, t, t]` (−∞ above the diagonal) and `q·kᵀ·s` masked by it, for q, k
/// `[b, h, t, d]`: the reference side of the one-kernel attention's op tests.
fn causal_scores(q: &Tensor<4>, k: &Tensor<4>, s: f64) -> (Tensor<4>, Tensor<4>) {
    let [b, h, t, _] = q.dims();
    let device = q.device();
    let future = Tensor::<2, Bool>::tril_mask([t, t], 0, &device);
    let bias = Tensor::<2>::zeros([t, t], &device)
        .mask_fill(future.clone(), f32::NEG_INFINITY)
        .reshape([1, 1, t, t]);
    let x = q
        .clone()
        .matmul(k.clone().swap_dims(2, 3))
        .mul_scalar(s)
        .mask_fill(
            future.unsqueeze::<4>().expand([b, h, t, t]),
            f32::NEG_INFINITY,
        );
    (bias, x)
}

/// The op under the one-kernel attention (`RowKernels::flash_attention`) against softmax and
/// matmuls: heads of 64 run the kernel, heads of 16 the fallback of scores and the softmax kernel.
/// The output `[batch, seq, head, d]` and the log-sum-exp of the masked, scaled scores.
#[test]
fn flash_attention_op_and_its_fallback_on_wgpu() {
    use crate::kernels::RowKernels;
    use burn::backend::Dispatch;
    let _one = crate::WGPU.lock();
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    device.seed(9);
    let (b, h, t, s) = (2, 3, 70, 0.3);
    for d in [64, 16] {
        let normal = Distribution::Normal(0.0, 1.0);
        let [q, k, v] = [0; 3].map(|_| Tensor::<4>::random([b, h, t, d], normal, &device));
        let (bias, x) = causal_scores(&q, &k, s);
        let expect_y = softmax(x.clone(), 3).matmul(v.clone()).swap_dims(1, 2);
        let max = x.clone().max_dim(3);
        let expect_lse = max.clone() + (x - max).exp().sum_dim(3).log();
        let seed = Tensor::<1>::zeros([2], &device);
        let (y, lse) = <Dispatch as RowKernels>::flash_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            bias.into_dispatch(),
            seed.into_dispatch(),
            s,
            1.0,
        );
        let (y, lse) = (
            Tensor::<4>::from_dispatch(y),
            Tensor::<4>::from_dispatch(lse),
        );
        assert_eq!(y.dims(), [b, t, h, d], "heads of {d}");
        let diff = max_diff(y, expect_y);
        assert!(diff < 1e-4, "output {diff}, heads of {d}");
        let diff = max_diff(lse, expect_lse);
        assert!(diff < 1e-4, "log-sum-exp {diff}, heads of {d}");
    }
}

/// The backward op of the one-kernel attention (`RowKernels::flash_attention_backward`) against
/// autodiff through softmax and matmuls: heads of 64 run the kernels, heads of 16 the fallback
/// (the scores, the softmax-gradient kernel, matmuls). The output gradient is a strided view, as
/// the caller's `[batch, seq, head, d]` gradient is; 130 queries leave the last tile part empty.
#[test]
fn flash_attention_backward_op_and_its_fallback_on_wgpu() {
    use crate::kernels::RowKernels;
    use burn::backend::Dispatch;
    let _one = crate::WGPU.lock();
    let plain = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    let device = plain.clone().autodiff();
    device.seed(11);
    let (b, h, t, s) = (2, 3, 130, 0.3);
    for d in [64, 16] {
        let normal = Distribution::Normal(0.0, 1.0);
        let [q, k, v] = [0; 3].map(|_| Tensor::<4>::random([b, h, t, d], normal, &device));
        let dy = Tensor::<4>::random([b, t, h, d], normal, &device).swap_dims(1, 2);
        let [q, k, v] = [q, k, v].map(|x| x.require_grad());
        let (bias, x) = causal_scores(&q, &k, s);
        let y = softmax(x, 3).matmul(v.clone());
        let grads = (y.clone() * dy.clone()).sum().backward();
        let expect = [&q, &k, &v].map(|x| x.grad(&grads).expect("a gradient"));
        let expect =
            Tensor::cat(expect.map(|g| g.swap_dims(1, 2)).to_vec(), 2).reshape([b, t, 3 * h * d]);
        let plain_of = |x: Tensor<4>| Tensor::<4>::from_data(x.to_data(), &plain).into_dispatch();
        let (q, k, v, bias) = (plain_of(q), plain_of(k), plain_of(v), plain_of(bias));
        let seed = Tensor::<1>::zeros([2], &plain).into_dispatch();
        let (o, lse) = <Dispatch as RowKernels>::flash_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            bias.clone(),
            seed.clone(),
            s,
            1.0,
        );
        let o = Tensor::<4>::from_dispatch(o)
            .swap_dims(1, 2)
            .into_dispatch();
        let dy = Tensor::<4>::from_data(dy.swap_dims(1, 2).to_data(), &plain).swap_dims(1, 2);
        let dqkv = <Dispatch as RowKernels>::flash_attention_backward(
            q,
            k,
            v,
            o,
            lse,
            dy.into_dispatch(),
            bias,
            seed,
            s,
            1.0,
        );
        let dqkv = Tensor::<3>::from_dispatch(dqkv);
        assert_eq!(dqkv.dims(), [b, t, 3 * h * d], "heads of {d}");
        let expect = Tensor::<3>::from_data(expect.to_data(), &plain);
        let diff = max_diff(dqkv, expect);
        assert!(diff < 1e-4, "grad qkv {diff}, heads of {d}");
    }
}

/// The wgpu device (autodiff) while holding the wgpu lock, or `None` (said on stderr) where it
/// has no f16 (llvmpipe): the f16 tests check nothing there.
fn f16_wgpu(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, Device)> {
    let one = crate::WGPU.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice).autodiff();
    if !device.supports_dtype(burn::tensor::DType::F16) {
        eprintln!("{test}: this wgpu device has no f16; nothing checked");
        return None;
    }
    Some((one, device))
}

/// The rows kernel in f16 (where the wgpu device has f16): loss and input gradient within f16
/// rounding of the f32 op's.
#[test]
fn linear_cross_entropy_in_f16_on_wgpu() {
    let Some((_one, device)) = f16_wgpu("linear_cross_entropy_in_f16_on_wgpu") else {
        return;
    };
    device.seed(6);
    let (n, d, v) = (64, 32, 1030);
    let h = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<2>::random([d, v], Distribution::Normal(0.0, 0.3), &device);
    let targets = Tensor::<1, Int>::random([n], Distribution::Uniform(0.0, v as f64), &device);
    let run = |dt: DType| {
        let h = h.clone().cast(dt).require_grad();
        let loss =
            linear_cross_entropy_in_chunks(h.clone(), w.clone().cast(dt), targets.clone(), 16, 1.0);
        let grads = loss.backward();
        let g = h.grad(&grads).expect("h's gradient").cast(DType::F32);
        (loss.cast(DType::F32), g)
    };
    let (l32, g32) = run(DType::F32);
    let (l16, g16) = run(DType::F16);
    let scale = g32.clone().abs().max().into_scalar::<f32>();
    assert!(
        max_diff(l32.clone(), l16.clone()) < 1e-2,
        "loss {l32} vs {l16}"
    );
    assert!(max_diff(g32, g16) < 1e-2 * scale, "h grads");
}

/// The loss scale reaches the head's f16 gradients through the op, which computes them in the
/// forward pass. At 2,048 rows, `(p − y)/n` is subnormal in f16 below p = 0.125 and zero below
/// p ≈ 1.2·10⁻⁴: the weight's gradient for classes no row targets (as the unseen tokens of a
/// vocabulary, which training pushes down) is lost; `scale·(p − y)/n` keeps it within f16
/// rounding of f32's.
#[test]
fn scaled_linear_cross_entropy_keeps_f16_gradients() {
    scaled_ce_case(&Device::flex().autodiff());
}

/// [`scaled_linear_cross_entropy_keeps_f16_gradients`] through the GPU's rows kernel and
/// vocabulary slices (where the wgpu device has f16).
#[test]
fn scaled_linear_cross_entropy_in_f16_on_wgpu() {
    if let Some((_one, device)) = f16_wgpu("scaled_linear_cross_entropy_in_f16_on_wgpu") {
        scaled_ce_case(&device);
    }
}

/// The two tests above on `device` (autodiff).
fn scaled_ce_case(device: &Device) {
    let device = device.clone();
    device.seed(7);
    let (n, d, v, targeted) = (2048, 64, 4096, 256);
    // Feature 0 is 1 in every row, and lowers the untargeted classes' logits by 6: their
    // probabilities are ~10⁻⁵ (so `p/n` ≈ 5·10⁻⁹ rounds to 0 in f16, `scale·p/n` is normal).
    let h = Tensor::cat(
        vec![
            Tensor::<2>::ones([n, 1], &device),
            Tensor::<2>::random([n, d - 1], Distribution::Normal(0.0, 1.0), &device),
        ],
        1,
    );
    let lowered = Tensor::cat(
        vec![
            Tensor::<2>::zeros([1, targeted], &device),
            Tensor::<2>::full([1, v - targeted], -6.0, &device),
        ],
        1,
    );
    let w = Tensor::cat(
        vec![
            lowered,
            Tensor::<2>::random([d - 1, v], Distribution::Normal(0.0, 0.1), &device),
        ],
        0,
    );
    let targets =
        Tensor::<1, Int>::random([n], Distribution::Uniform(0.0, targeted as f64), &device);
    // The gradients w.r.t. h and w (its untargeted columns) of the loss times `scale`, divided
    // by it, in f32.
    let grads = |dt: DType, scale: f64| {
        let h = h.clone().cast(dt).require_grad();
        let w = w.clone().cast(dt).require_grad();
        let loss =
            linear_cross_entropy_in_chunks(h.clone(), w.clone(), targets.clone(), 512, scale);
        let g = loss.backward();
        let unscaled = |t: Tensor<2>| t.cast(DType::F32).div_scalar(scale);
        let gw = w
            .grad(&g)
            .expect("w's gradient")
            .narrow(1, targeted, v - targeted);
        (unscaled(h.grad(&g).expect("h's gradient")), unscaled(gw))
    };
    let rel = |a: Tensor<2>, b: Tensor<2>| {
        let err = (a - b.clone()).powi_scalar(2).sum().sqrt();
        (err / b.powi_scalar(2).sum().sqrt()).into_scalar::<f32>()
    };
    let (h32, w32) = grads(DType::F32, 1.0);
    let (h16, w16) = grads(DType::F16, 32768.0);
    let (hu, wu) = grads(DType::F16, 1.0);
    let scaled = (rel(h16, h32.clone()), rel(w16, w32.clone()));
    let unscaled = (rel(hu, h32), rel(wu, w32));
    println!("relative errors in f16 (h, untargeted w), scaled {scaled:?}, unscaled {unscaled:?}");
    assert!(scaled.0 < 5e-3 && scaled.1 < 5e-3, "scaled: {scaled:?}");
    assert!(unscaled.1 > 0.5, "unscaled: {unscaled:?}");
}

/// The attention op in f16 (where the wgpu device has f16; on cubecl its softmax and softmax
/// backward are row kernels): output and `qkv` gradient within f16 rounding of the f32 op's.
#[test]
fn attention_in_f16_on_wgpu() {
    let Some((_one, device)) = f16_wgpu("attention_in_f16_on_wgpu") else {
        return;
    };
    // Heads of 16 (query blocks) and of 64 (one kernel, `flash.rs`).
    for d in [16, 64] {
        attention_f16_case(&device, d);
    }
}

/// [`attention_in_f16_on_wgpu`] with heads of `d`.
fn attention_f16_case(device: &Device, d: usize) {
    device.seed(8);
    let (b, h, t) = (2, 4, 96);
    let qkv = Tensor::<3>::random([b, t, 3 * h * d], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), device);
    let bias = Tensor::<2>::zeros([t, t], device)
        .mask_fill(
            Tensor::<2, Bool>::tril_mask([t, t], 0, device),
            f32::NEG_INFINITY,
        )
        .reshape([1, 1, t, t]);
    // Hashed dropout: the same mask in both dtypes.
    let seed = Tensor::<1>::random([2], Distribution::Default, device);
    let run = |dt: DType, blocks: Option<usize>| {
        let x = qkv.clone().cast(dt).require_grad();
        let drop = AttentionDropout::Hashed(seed.clone(), 0.9);
        let bias = bias.clone().cast(dt);
        let y = causal_attention_in_blocks(x.clone(), bias, Some(drop), h, 0.25, blocks);
        let grads = (y.clone().cast(DType::F32) * w.clone()).sum().backward();
        let g = x.grad(&grads).expect("qkv's gradient").cast(DType::F32);
        (y.cast(DType::F32), g)
    };
    let (y32, g32) = run(DType::F32, Some(1));
    // One block and three (the f16 key gradients summed over the blocks).
    for blocks in [Some(1), Some(3)] {
        let (y16, g16) = run(DType::F16, blocks);
        let diff = max_diff(y32.clone(), y16);
        assert!(diff < 1e-2, "attention values {diff}, heads of {d}");
        let scale = g32.clone().abs().max().into_scalar::<f32>();
        let diff = max_diff(g32.clone(), g16);
        assert!(
            diff < 1e-2 * scale,
            "qkv grads {diff} (max {scale}), heads of {d}"
        );
    }
}

/// The LayerNorm kernels in f16 (where the wgpu device has f16): f16 in and out, f32 inside;
/// values and the x gradient within f16 rounding of the f32 op's.
#[test]
fn layer_norm_in_f16_on_wgpu() {
    let Some((_one, device)) = f16_wgpu("layer_norm_in_f16_on_wgpu") else {
        return;
    };
    device.seed(10);
    let shape = [4, 33, 768];
    let x = Tensor::<3>::random(shape, Distribution::Normal(0.5, 2.0), &device);
    let w = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let gamma = Tensor::<1>::random([768], Distribution::Normal(1.0, 0.5), &device);
    let beta = Tensor::<1>::random([768], Distribution::Normal(0.0, 0.5), &device);
    let run = |dt: DType| {
        let x = x.clone().cast(dt).require_grad();
        let y = layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5);
        assert_eq!(y.dtype(), dt);
        let grads = (y.clone().cast(DType::F32) * w.clone()).sum().backward();
        let g = x.grad(&grads).expect("x's gradient").cast(DType::F32);
        (y.cast(DType::F32), g)
    };
    let (y32, g32) = run(DType::F32);
    let (y16, g16) = run(DType::F16);
    assert!(max_diff(y32, y16) < 2e-2, "layer norm values");
    let scale = g32.clone().abs().max().into_scalar::<f32>();
    assert!(max_diff(g32, g16) < 1e-2 * scale, "x grads");
    // LayerNorm + LoRA in f16 (gamma and beta f32): the one-pass kernel of A's gradient with
    // f16 rows and f32 norm parameters, against the two ops in f16.
    for (keep, train_base) in [(1.0, false), (0.9, false), (0.9, true)] {
        norm_lora_case(&device, DType::F16, 300, keep, train_base, 1e-2);
    }
}

/// Hashed dropout's mask: the kept fraction is `keep`, and masks of nearby rows, nearby columns
/// and nearby seeds agree as independent draws would (`keep² + (1 − keep)²` of the elements).
#[test]
fn hashed_dropout_mask_is_bernoulli() {
    let (rows, t, keep) = (512, 1024, 0.9);
    let n = (rows * t) as f64;
    let m = hashed_mask_values([0.25, 0.5], rows, t, keep);
    let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / n;
    // 4.5 standard deviations of a Bernoulli(0.9) mean over 524,288 draws: 0.0019.
    assert!((kept - keep).abs() < 0.002, "kept {kept}");
    assert!(m.iter().all(|&v| v == 0.0 || v == (1.0 / keep) as f32));
    let agree = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .filter(|(x, y)| (**x == 0.0) == (**y == 0.0))
            .count() as f64
            / a.len() as f64
    };
    let expected = keep * keep + (1.0 - keep) * (1.0 - keep);
    let next_seed = hashed_mask_values([0.25 + 1.0 / 16_777_216.0, 0.5], rows, t, keep);
    let other_s1 = hashed_mask_values([0.25, 0.5 + 1.0 / 16_777_216.0], rows, t, keep);
    let next_row = agree(&m[..m.len() - t], &m[t..]);
    let next_col = agree(&m[..m.len() - 1], &m[1..]);
    for (what, x) in [
        ("seed + 1", agree(&m, &next_seed)),
        ("second seed + 1", agree(&m, &other_s1)),
        ("next row", next_row),
        ("next column", next_col),
    ] {
        assert!((x - expected).abs() < 0.003, "{what}: {x} vs {expected}");
    }
}

/// LayerNorm + LoRA as one op (`norm_lora`) against the two ops it replaces (the fused
/// LayerNorm, then `lora_core`'s LoRA op): values and the gradients of x, gamma, beta, A, B, and
/// of W and the bias where `train_base`; `keep` < 1: the dropout drawn again in the backward pass;
/// `t` tokens a sequence (2 sequences: from 512 rows A's gradient is one kernel on GPUs); x and
/// the linear in `dt` (gamma and beta f32, as in half-precision training).
fn norm_lora_case(device: &Device, dt: DType, t: usize, keep: f64, train_base: bool, tol: f32) {
    use crate::norm_lora::layer_norm_lora_linear;
    use lora_core::fused::LoraParts;
    device.seed(12);
    let (k, n, r) = (72, 40, 4);
    let normal = |shape: [usize; 3], mean: f64, sd: f64| {
        Tensor::<3>::random(shape, Distribution::Normal(mean, sd), device)
    };
    let x = normal([2, t, k], 0.5, 2.0).cast(dt);
    let gamma = normal([1, 1, k], 1.0, 0.5).reshape([k]);
    let beta = normal([1, 1, k], 0.0, 0.5).reshape([k]);
    let w = normal([1, k, n], 0.0, 0.2).reshape([k, n]).cast(dt);
    let bias = normal([1, 1, n], 0.0, 0.5).reshape([n]).cast(dt);
    let a = normal([1, r, k], 0.0, 0.3).reshape([r, k]).cast(dt);
    let b = normal([1, n, r], 0.0, 0.3).reshape([n, r]).cast(dt);
    let g = normal([2, t, n], 0.0, 1.0).cast(dt);
    let run = |fused: bool| {
        let base = |t: Tensor<2>| if train_base { t.require_grad() } else { t };
        let (xi, gi, bi) = (
            x.clone().require_grad(),
            gamma.clone().require_grad(),
            beta.clone().require_grad(),
        );
        let (wi, ai, bbi) = (
            base(w.clone()),
            a.clone().require_grad(),
            b.clone().require_grad(),
        );
        let biasi = match train_base {
            true => bias.clone().require_grad(),
            false => bias.clone(),
        };
        let parts = LoraParts {
            weight: wi.clone(),
            bias: Some(biasi.clone()),
            a: ai.clone(),
            b: bbi.clone(),
            seed: (keep < 1.0).then(|| Tensor::<1>::from_floats([0.375f32, 0.8125], device)),
            keep,
            scale: 1.7,
        };
        let y = match fused {
            true => layer_norm_lora_linear(xi.clone(), gi.clone(), bi.clone(), 1e-5, parts),
            false => parts.forward(layer_norm(xi.clone(), gi.clone(), bi.clone(), 1e-5)),
        };
        let grads = (y.clone() * g.clone()).sum().backward();
        let flat = |t: Option<Tensor<1>>| t.map(|t| t.reshape([-1]).cast(DType::F32));
        let grad2 = |t: &Tensor<2>| flat(t.grad(&grads).map(|t| t.reshape([-1])));
        [
            flat(Some(y.reshape([-1]))),
            flat(xi.grad(&grads).map(|t| t.reshape([-1]))),
            flat(gi.grad(&grads)),
            flat(bi.grad(&grads)),
            grad2(&wi),
            flat(biasi.grad(&grads)),
            grad2(&ai),
            grad2(&bbi),
        ]
    };
    let (two, one) = (run(false), run(true));
    let names = ["values", "x", "gamma", "beta", "W", "bias", "A", "B"];
    for ((name, p), q) in names.into_iter().zip(two).zip(one) {
        let what =
            format!("{name}, {dt:?}, t {t}, keep {keep}, trained base {train_base}, {device:?}");
        match (p, q) {
            (Some(p), Some(q)) => {
                // Relative to the largest magnitude (sums over rows run in another order).
                let e = max_diff(p.clone(), q) / p.abs().max().into_scalar::<f32>();
                assert!(e < tol, "LayerNorm + LoRA: relative error {e}, {what}");
            }
            (None, None) => assert!(
                !train_base && matches!(name, "W" | "bias"),
                "no gradient: {what}"
            ),
            _ => panic!("a gradient on one side only: {what}"),
        }
    }
}

#[test]
fn fused_layer_norm_lora_is_layer_norm_then_lora() {
    for d in devices() {
        for (keep, train_base) in [(1.0, false), (0.9, false), (0.9, true)] {
            norm_lora_case(&d.clone().autodiff(), DType::F32, 9, keep, train_base, 1e-5);
        }
    }
}
