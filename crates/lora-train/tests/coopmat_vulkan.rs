//! f16 products through `lora_core::gemm::product` on `Device::vulkan` (built with `--features
//! vulkan`): where the device has workgroup-scope cooperative matrices, they run
//! `lora_core::coopmat`'s kernel. Checked against f32 products on flex from the same
//! f16-rounded values: ragged edges, transposed operands, a strided view with an offset, batches
//! stacked as blocks of rows and a broadcast operand; and the products that must stay Burn's. Run
//! on a GPU: `cargo test --release -p lora-train --features vulkan --test coopmat_vulkan` (set
//! `EXPECT_COOPMAT=1` to fail where the kernel did not run).
#![cfg(feature = "vulkan")]

use burn::tensor::{DType, Device, DeviceKind, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| half::f16::from_f32(rng.random_range(-1.0..1.0)).to_f32())
        .collect()
}

fn tensor<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(values(n, seed), shape), device)
}

/// `a · b` on vulkan in f16 against flex in f32; `prep` turns the stored operands into the
/// product's (transposes, slices). `ours`: whether the workgroup-scope kernel must run it (checked
/// with `EXPECT_COOPMAT` set) or Burn's matmul (always checked).
fn case<const D: usize>(
    a_shape: [usize; D],
    b_shape: [usize; D],
    ours: bool,
    prep: impl Fn(Tensor<D>, Tensor<D>) -> (Tensor<D>, Tensor<D>),
) {
    let (gpu, cpu) = (Device::vulkan(DeviceKind::DefaultDevice), Device::flex());
    let before = lora_core::coopmat::launches();
    let (a, b) = prep(tensor(a_shape, 1, &gpu), tensor(b_shape, 2, &gpu));
    let got = lora_core::gemm::product(a.cast(DType::F16), b.cast(DType::F16))
        .cast(DType::F32)
        .into_data();
    let ran = lora_core::coopmat::launches() - before;
    let (a, b) = prep(tensor(a_shape, 1, &cpu), tensor(b_shape, 2, &cpu));
    let want = a.matmul(b).into_data();
    assert_eq!(got.shape(), want.shape());
    let (got, want) = (
        got.try_to_vec::<f32>().unwrap(),
        want.try_to_vec::<f32>().unwrap(),
    );
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0f32, f32::max);
    // f32 sums rounded once to f16: a relative error of 2⁻¹¹, plus the sums' order.
    assert!(
        err < 2e-3,
        "{a_shape:?} · {b_shape:?}: max relative error {err}"
    );
    println!("{a_shape:?} · {b_shape:?}: coopmat launches {ran}, max relative error {err}");
    if !ours {
        assert_eq!(
            ran, 0,
            "{a_shape:?} · {b_shape:?} falls back to Burn's matmul"
        );
    } else if std::env::var("EXPECT_COOPMAT").is_ok() {
        assert_eq!(
            ran, 1,
            "{a_shape:?} · {b_shape:?} runs the workgroup-scope kernel"
        );
    }
}

#[test]
fn f16_products_on_vulkan() {
    // Ragged in m, n and k (tiles of 128 × 128, steps of 64). The kernel takes k > n only.
    case([300, 200], [200, 136], true, |a, b| (a, b));
    // Column-major operands: transposed views of stored matrices.
    case([200, 304], [136, 200], true, |a, b| {
        (a.transpose(), b.transpose())
    });
    // A strided view with an offset (columns 128..256 of rows 384 wide), as attention's heads.
    case([100, 384], [128, 80], true, |a, b| {
        (a.slice([0..100, 128..256]), b)
    });
    // A batch of one; k ≤ n (Burn's).
    case([1, 256, 96], [1, 96, 72], true, |a, b| (a, b));
    case([256, 96], [96, 128], false, |a, b| (a, b));
    // Batches stacked as blocks of rows: both row-major (k ragged: b's tile reads into the next
    // matrix, times a's zeros), b transposed per matrix, a broadcast b (a weight), a transposed
    // a with k a multiple of 64.
    case([2, 3, 128, 200], [2, 3, 200, 72], true, |a, b| (a, b));
    case([2, 3, 128, 96], [2, 3, 72, 96], true, |a, b| {
        (a, b.swap_dims(2, 3))
    });
    case([4, 256, 96], [1, 96, 72], true, |a, b| (a, b));
    case([2, 192, 128], [2, 192, 80], true, |a, b| {
        (a.swap_dims(1, 2), b)
    });
    // Burn's: both tiles could read past k into the next matrix (a transposed, k = 200); m not a
    // multiple of 128 in a batch; batch dims that neither match nor broadcast.
    case([2, 200, 128], [2, 200, 80], false, |a, b| {
        (a.swap_dims(1, 2), b)
    });
    case([2, 3, 130, 96], [2, 3, 96, 72], false, |a, b| (a, b));
    case([2, 1, 128, 96], [1, 3, 96, 72], false, |a, b| (a, b));
}

/// GPT-2's causal attention in f16 on vulkan against the same in f32 on vulkan (`lora_gpt`'s
/// f32 kernels), from the same f16-rounded `qkv [b, t, 3·h·64]`: the forward on strided heads
/// (inference), and forward and backward on an autodiff device (the heads copied), with and
/// without hashed dropout. In f16 the forward and backward are `lora_gpt::flash_cm`'s
/// workgroup-scope kernels where the device has them (checked with `EXPECT_COOPMAT` set); the
/// backward recomputes the probabilities from the forward's log-sum-exp.
fn attention_case(b: usize, h: usize, t: usize, drop: bool) {
    use lora_gpt::fused::{AttentionDropout, causal_attention};
    let gpu = Device::vulkan(DeviceKind::DefaultDevice);
    let seed = Tensor::<1>::from_data(TensorData::new(vec![0.25f32, 0.625], [2]), &gpu);
    let qkv = tensor([b, t, 3 * h * 64], 3, &gpu);
    let w = tensor([b, h, t, 64], 4, &gpu);
    let bias = Tensor::<2>::zeros([t, t], &gpu)
        .mask_fill(
            Tensor::<2, burn::tensor::Bool>::tril_mask([t, t], 0, &gpu),
            f32::NEG_INFINITY,
        )
        .reshape([1, 1, t, t]);
    let run = |dtype: DType, device: &Device| {
        let to = |x: &Tensor<3>| Tensor::<3>::from_data(x.to_data(), device).cast(dtype);
        let keep =
            drop.then(|| AttentionDropout::Hashed(Tensor::from_data(seed.to_data(), device), 0.9));
        let bias = Tensor::<4>::from_data(bias.to_data(), device).cast(dtype);
        let qkv = to(&qkv).require_grad();
        let y = causal_attention(qkv.clone(), bias, keep, h, 0.125);
        let wd = Tensor::<4>::from_data(w.to_data(), device).cast(dtype);
        let grads = (y.clone() * wd).sum().backward();
        let g = qkv.grad(&grads).expect("a gradient").cast(DType::F32);
        // Read back here: fused ops run when their results are read.
        (y.cast(DType::F32).into_data(), g.into_data())
    };
    let ad = gpu.clone().autodiff();
    let before = lora_gpt::flash_cm::launches();
    let back = lora_gpt::flash_cm::backward_launches();
    let (y16, g16) = run(DType::F16, &ad);
    let ran = lora_gpt::flash_cm::launches() - before;
    let ran_back = lora_gpt::flash_cm::backward_launches() - back;
    let (y32, g32) = run(DType::F32, &ad);
    let diff = |a: &TensorData, b: &TensorData| {
        let (a, b) = (
            a.try_to_vec::<f32>().unwrap(),
            b.try_to_vec::<f32>().unwrap(),
        );
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        (d, b.iter().map(|y| y.abs()).fold(0f32, f32::max))
    };
    let what = format!("attention [{b}, {h}, {t}], dropout {drop}");
    // Averages of f16 values in [-1, 1] with f16 probabilities: errors of a few 2⁻¹¹.
    let (dy, _) = diff(&y16, &y32);
    let (dg, scale) = diff(&g16, &g32);
    let dg = dg / scale;
    println!(
        "{what}: forward launches {ran}, backward {ran_back}, output {dy}, gradient {dg} (relative)"
    );
    assert!(dy < 4e-3, "{what}: output {dy}");
    assert!(dg < 1e-2, "{what}: gradient {dg} relative to its largest");
    // Inference: the heads as strided views of qkv.
    let before = lora_gpt::flash_cm::launches();
    let (yi, _) = {
        let qkv = Tensor::<3>::from_data(qkv.to_data(), &gpu).cast(DType::F16);
        let keep = drop.then(|| AttentionDropout::Hashed(seed.clone(), 0.9));
        let bias = bias.clone().cast(DType::F16);
        let y = causal_attention(qkv, bias, keep, h, 0.125).cast(DType::F32);
        (y.into_data(), ())
    };
    let ran_views = lora_gpt::flash_cm::launches() - before;
    let (di, _) = diff(&yi, &y32);
    println!("{what}: inference launches {ran_views}, output {di}");
    assert!(di < 4e-3, "{what}: inference output {di}");
    if std::env::var("EXPECT_COOPMAT").is_ok() {
        assert_eq!(
            (ran, ran_back, ran_views),
            (1, 1, 1),
            "{what} runs the workgroup-scope forward and backward"
        );
    }
}

#[test]
fn f16_attention_on_vulkan() {
    // Ragged (200: the last query and key blocks part-filled), and GPT-2's head count.
    attention_case(2, 3, 200, false);
    attention_case(2, 3, 200, true);
    attention_case(1, 12, 256, true);
}
