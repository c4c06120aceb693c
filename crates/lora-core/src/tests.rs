use crate::utils::freeze_lora;
use crate::*;
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

fn dev() -> Device {
    let d = Device::flex();
    d.seed(7);
    d
}

fn max_abs<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

/// flex, ndarray and wgpu (on CPU-only machines through Mesa's llvmpipe).
fn backends() -> [Device; 3] {
    #[allow(deprecated)]
    let ndarray = Device::ndarray();
    let wgpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    [Device::flex(), ndarray, wgpu]
}

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// A LoRA linear with random non-zero B, as the reference's merge checks use.
fn layer(device: &Device, rank: usize) -> LoraLinear {
    let mut l = LoraLinearConfig::new(48, 144)
        .with_rank(rank)
        .with_alpha(32.0)
        .init(device);
    l.lora_b = l
        .lora_b
        .map(|b| b.map(|t| t.random_like(Distribution::Normal(0.0, 0.1))));
    l
}

#[test]
fn init_laws_and_shapes() {
    let d = dev();
    let l = LoraLinearConfig::new(48, 144)
        .with_rank(8)
        .with_alpha(32.0)
        .init(&d);
    assert_eq!(l.weight.dims(), [48, 144]);
    assert_eq!(l.lora_a.as_ref().unwrap().dims(), [8, 48]);
    assert_eq!(l.lora_b.as_ref().unwrap().dims(), [144, 8]);
    assert_eq!(l.scaling, 4.0);
    let a = vals(l.lora_a.as_ref().unwrap().val());
    let bound = 1.0 / 48f32.sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound));
    // Uniform(-b, b) has variance b²/3.
    let var = a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32;
    assert!(
        (var / (bound * bound / 3.0) - 1.0).abs() < 0.2,
        "A variance {var}"
    );
    assert!(
        vals(l.lora_b.as_ref().unwrap().val())
            .iter()
            .all(|&v| v == 0.0)
    );

    let e = LoraEmbeddingConfig::new(500, 16)
        .with_rank(4)
        .with_alpha(8.0)
        .init(&d);
    assert_eq!(e.lora_a.as_ref().unwrap().dims(), [4, 500]);
    assert_eq!(e.lora_b.as_ref().unwrap().dims(), [16, 4]);
    let a = vals(e.lora_a.as_ref().unwrap().val());
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    let std = (a.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / a.len() as f32).sqrt();
    assert!(
        mean.abs() < 0.1 && (std - 1.0).abs() < 0.1,
        "A ~ N(0,1): mean {mean} std {std}"
    );
}

#[test]
fn scaling_conventions() {
    assert_eq!(Scaling::AlphaOverRank.factor(32.0, 8), 4.0);
    assert_eq!(Scaling::Alpha.factor(32.0, 8), 32.0);
    assert!((Scaling::RsLora.factor(16.0, 4) - 8.0).abs() < 1e-12);
    assert_eq!(Scaling::RsLora.factor(16.0, 0), 0.0);
    let l = LoraLinearConfig::new(4, 4)
        .with_rank(2)
        .with_alpha(3.0)
        .with_scaling(Scaling::Alpha)
        .init(&dev());
    assert_eq!(l.scaling, 3.0);
}

#[test]
fn rank_zero_is_the_plain_linear() {
    let d = dev();
    let l = LoraLinearConfig::new(8, 5).init(&d);
    assert!(l.lora_a.is_none() && l.lora_b.is_none());
    assert_eq!(l.rank(), 0);
    let plain = burn::nn::Linear {
        weight: l.weight.clone(),
        bias: l.bias.clone(),
    };
    let x = Tensor::<3>::random([2, 3, 8], Distribution::Default, &d);
    assert_eq!(vals(l.forward(x.clone())), vals(plain.forward(x.clone())));
    assert_eq!(
        vals(l.clone().merge().forward(x.clone())),
        vals(plain.forward(x))
    );
    assert_eq!(param_report(&l.clone().merge()).total, 8 * 5 + 5);
}

#[test]
fn factored_forward_matches_formula() {
    let d = dev();
    let l = layer(&d, 8);
    let x = Tensor::<2>::random([64, 48], Distribution::Normal(0.0, 1.0), &d);
    let (w, b) = (l.weight.val(), l.bias.as_ref().unwrap().val());
    let (a, bb) = (
        l.lora_a.as_ref().unwrap().val(),
        l.lora_b.as_ref().unwrap().val(),
    );
    let formula = x.clone().matmul(w)
        + b.unsqueeze::<2>()
        + x.clone()
            .matmul(a.transpose())
            .matmul(bb.transpose())
            .mul_scalar(4.0);
    assert!(max_abs(l.forward(x), formula) < 1e-6);
}

#[test]
fn gpu_inference_path_matches_formula() {
    // On a cubecl device without autodiff the unmerged forward runs the training path's one op
    // (the base product, the `lora_down` and `lora_up` kernels) without dropout: same function.
    // CPU-only machines run this through Mesa's llvmpipe.
    let d = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    d.seed(7);
    for rank in [8, 2, 1] {
        let l = layer(&d, rank);
        let x = Tensor::<3>::random([2, 16, 48], Distribution::Normal(0.0, 1.0), &d);
        let (w, b) = (l.weight.val(), l.bias.as_ref().unwrap().val());
        let (a, bb) = (
            l.lora_a.as_ref().unwrap().val(),
            l.lora_b.as_ref().unwrap().val(),
        );
        let scale = l.scaling;
        let formula = x.clone().matmul(w.unsqueeze())
            + b.unsqueeze::<3>()
            + x.clone()
                .matmul(a.transpose().unsqueeze())
                .matmul(bb.transpose().unsqueeze())
                .mul_scalar(scale);
        let got = l.forward(x);
        assert_eq!(got.dims(), [2, 16, 144]);
        let diff = max_abs(got, formula);
        assert!(diff < 1e-4, "rank {rank}: differs by {diff}");
    }
}

#[test]
fn merge_roundtrip_and_idempotence() {
    let d = dev();
    let l = layer(&d, 8);
    let w0 = l.weight.val();
    let x = Tensor::<2>::random([64, 48], Distribution::Normal(0.0, 1.0), &d);
    let y_unmerged = l.forward(x.clone());

    let merged = l.merge();
    assert!(merged.merged);
    let w_merged = merged.weight.val();
    let (a, b) = (
        merged.lora_a.as_ref().unwrap().val(),
        merged.lora_b.as_ref().unwrap().val(),
    );
    let expect = w0.clone() + b.matmul(a).transpose().mul_scalar(4.0);
    assert!(max_abs(w_merged.clone(), expect) < 1e-6);
    assert!(
        max_abs(merged.forward(x.clone()), y_unmerged.clone()) < 1e-5,
        "merged = unmerged"
    );

    let twice = merged.merge();
    assert_eq!(
        vals(twice.weight.val()),
        vals(w_merged),
        "second merge is a no-op"
    );

    let back = twice.unmerge();
    assert!(!back.merged);
    assert!(
        max_abs(back.weight.val(), w0.clone()) <= 1e-6,
        "round trip restores W"
    );
    let back2 = back.unmerge();
    assert_eq!(vals(back2.weight.val()), vals(back2.clone().weight.val()));
    assert!(
        max_abs(back2.weight.val(), w0) <= 1e-6,
        "second unmerge is a no-op"
    );
    assert!(max_abs(back2.forward(x), y_unmerged) < 1e-5);
}

#[test]
fn frozen_base_in_half_precision() {
    use burn::tensor::DType;
    let d = Device::flex().autodiff();
    d.seed(7);
    let l = mark_only_lora_as_trainable(layer(&d, 8));
    let x = Tensor::<2>::random([64, 48], Distribution::Normal(0.0, 1.0), &d).cast(DType::F16);
    let cast_on_use = l.forward(x.clone());
    let stored = l.clone().store_frozen_base_in(DType::F16);
    assert_eq!(stored.weight.val().dtype(), DType::F16);
    assert_eq!(stored.bias.as_ref().unwrap().val().dtype(), DType::F16);
    assert_eq!(stored.lora_a.as_ref().unwrap().val().dtype(), DType::F32);
    assert_eq!(stored.lora_b.as_ref().unwrap().val().dtype(), DType::F32);
    let y = stored.forward(x.clone());
    let f32s = |t: Tensor<2>| vals(t.cast(DType::F32));
    assert_eq!(
        f32s(y.clone()),
        f32s(cast_on_use),
        "same values as casting on use"
    );
    // The adapter still trains; the base gets no gradient.
    let grads = y.cast(DType::F32).sum().backward();
    assert!(stored.lora_a.as_ref().unwrap().val().grad(&grads).is_some());
    assert!(stored.weight.val().grad(&grads).is_none());
    // Merging rounds the delta to the base's dtype.
    let merged = stored.merge();
    assert_eq!(merged.weight.val().dtype(), DType::F16);
    let err = max_abs(
        merged.forward(x.clone()).cast(DType::F32),
        l.forward(x.clone()).cast(DType::F32),
    );
    assert!(err < 0.05, "merged f16 base off by {err}");
    // A trained base (full fine-tuning) keeps its f32 master weights.
    let all = layer(&d, 8).store_frozen_base_in(DType::F16);
    assert_eq!(all.weight.val().dtype(), DType::F32);
}

#[test]
fn embedding_forward_and_merge() {
    let d = dev();
    let mut e = LoraEmbeddingConfig::new(24, 16)
        .with_rank(4)
        .with_alpha(8.0)
        .init(&d);
    e.lora_b = e
        .lora_b
        .map(|b| b.map(|t| t.random_like(Distribution::Normal(0.0, 0.1))));
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 5, 23, 5, 1, 2], [2, 3]), &d);
    let y = e.forward(ids.clone());
    // Row i of the effective table is W[i] + s·(B A)[:, i].
    let table = e.weight.val()
        + e.lora_b
            .as_ref()
            .unwrap()
            .val()
            .matmul(e.lora_a.as_ref().unwrap().val())
            .transpose()
            .mul_scalar(2.0);
    let expect = burn::tensor::module::embedding(table, ids.clone());
    assert!(max_abs(y.clone(), expect) < 1e-6);
    let w0 = e.weight.val();
    let m = e.merge();
    assert!(max_abs(m.forward(ids.clone()), y) < 1e-5);
    let back = m.merge().unmerge().unmerge();
    assert!(max_abs(back.weight.val(), w0) <= 1e-6);
}

#[test]
fn dropout_only_touches_the_adapter_input() {
    let d = Device::flex().autodiff();
    d.seed(1);
    let l = LoraLinearConfig::new(16, 8)
        .with_rank(4)
        .with_alpha(4.0)
        .with_dropout(0.5)
        .init(&d);
    let x = Tensor::<2>::random([4, 16], Distribution::Default, &d);
    // B = 0: dropout on the adapter path cannot change the output.
    let base = burn::nn::Linear {
        weight: l.weight.clone(),
        bias: l.bias.clone(),
    };
    assert!(max_abs(l.forward(x.clone()), base.forward(x)) < 1e-6);
}

#[derive(Module, Debug)]
struct Tiny {
    fc1: LoraLinear,
    fc2: LoraLinear,
    emb: LoraEmbedding,
}

fn tiny(d: &Device) -> Tiny {
    Tiny {
        fc1: LoraLinearConfig::new(6, 10)
            .with_rank(2)
            .with_alpha(4.0)
            .init(d),
        fc2: LoraLinearConfig::new(10, 3).init(d),
        emb: LoraEmbeddingConfig::new(7, 6)
            .with_rank(2)
            .with_alpha(2.0)
            .init(d),
    }
}

impl Tiny {
    fn loss(&self, ids: Tensor<2, Int>) -> Tensor<1> {
        self.fc2
            .forward(self.fc1.forward(self.emb.forward(ids)).tanh())
            .powi_scalar(2)
            .mean()
    }
}

#[test]
fn freezing_and_param_report() {
    let d = Device::flex().autodiff();
    let m = tiny(&d);
    let lora = 2 * 6 + 10 * 2 + 2 * 7 + 6 * 2;
    let total = 6 * 10 + 10 + 10 * 3 + 3 + 7 * 6 + lora;
    let all = param_report(&m);
    assert_eq!(
        all,
        ParamReport {
            total,
            trainable: total,
            lora
        }
    );
    let only = mark_only_lora_as_trainable(m);
    assert_eq!(
        param_report(&only),
        ParamReport {
            total,
            trainable: lora,
            lora
        }
    );
    let frozen = freeze_lora(only);
    assert_eq!(
        param_report(&frozen),
        ParamReport {
            total,
            trainable: total - lora,
            lora
        }
    );
    assert!(format!("{}", param_report(&frozen)).contains("trainable params"));
}

#[test]
fn only_lora_params_change_in_a_step() {
    let d = Device::flex().autodiff();
    d.seed(3);
    let mut m = mark_only_lora_as_trainable(tiny(&d));
    // Make B non-zero so A also receives a gradient.
    m.fc1.lora_b = m.fc1.lora_b.map(|p| {
        p.map(|t| {
            t.random_like(Distribution::Normal(0.0, 0.5))
                .detach()
                .require_grad()
        })
    });
    m.emb.lora_b = m.emb.lora_b.map(|p| {
        p.map(|t| {
            t.random_like(Distribution::Normal(0.0, 0.5))
                .detach()
                .require_grad()
        })
    });
    let before = m.clone();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 6], [2, 2]), &d);
    let mut grads = GradientsParams::from_grads(m.loss(ids).backward(), &m);
    clip_grad_norm(&m, &mut grads, 1.0);
    let mut optim = AdamWConfig::new().with_weight_decay(0.1).init();
    let after = optim.step(1e-2, m, grads);
    let same = |a: &Param<Tensor<2>>, b: &Param<Tensor<2>>| vals(a.val()) == vals(b.val());
    assert!(
        same(&before.fc1.weight, &after.fc1.weight),
        "base weight moved"
    );
    assert!(
        same(&before.fc2.weight, &after.fc2.weight),
        "frozen layer moved"
    );
    assert!(
        same(&before.emb.weight, &after.emb.weight),
        "embedding table moved"
    );
    assert_eq!(
        vals(before.fc1.bias.unwrap().val()),
        vals(after.fc1.bias.unwrap().val())
    );
    for (b, a) in [
        (&before.fc1.lora_a, &after.fc1.lora_a),
        (&before.fc1.lora_b, &after.fc1.lora_b),
        (&before.emb.lora_a, &after.emb.lora_a),
        (&before.emb.lora_b, &after.emb.lora_b),
    ] {
        assert!(
            !same(b.as_ref().unwrap(), a.as_ref().unwrap()),
            "a LoRA factor did not move"
        );
    }
}

/// The loss scaler: finite gradients come back divided by the scale (equal to the unscaled
/// pass's); a non-finite one zeroes the step's gradients and, read with the next step's loss,
/// halves the scale; the scale doubles after `interval` good steps.
#[test]
fn loss_scaler_unscales_skips_zeroes_and_grows() {
    for base in backends() {
        loss_scaler_case(base.autodiff());
    }
}

/// [`loss_scaler_unscales_skips_zeroes_and_grows`] on `d` (autodiff).
fn loss_scaler_case(d: Device) {
    d.seed(6);
    let m = tiny(&d);
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 6], [2, 2]), &d);
    let lora_a = m.fc1.lora_a.as_ref().unwrap().id;
    let plain = GradientsParams::from_grads(m.loss(ids.clone()).backward(), &m);
    let want = vals(plain.get::<2>(lora_a).unwrap());
    let mut scaler = LossScaler::new(1024.0, 2);
    // One step at the scaler's scale (`poison`: a gradient made infinite); the loss read back.
    let step_clipped = |scaler: &mut LossScaler, poison: bool, max_norm: Option<f64>| {
        let scale = scaler.scale();
        let loss = m.loss(ids.clone());
        let mut grads = GradientsParams::from_grads(loss.clone().mul_scalar(scale).backward(), &m);
        if poison {
            let id = m.fc1.lora_b.as_ref().unwrap().id;
            let g = grads.remove::<2>(id).unwrap();
            grads.register::<2>(id, g.div_scalar(0.0));
        }
        let expect = vals(loss.clone().inner())[0] as f64;
        let now = scaler.unscale(&m, &mut grads, max_norm);
        let got = scaler.settle(loss.inner().reshape([1]));
        assert!((got.loss - expect).abs() < 1e-6, "the loss read back");
        (grads, (now, got.take, got.late_overflow))
    };
    let step = |scaler: &mut LossScaler, poison: bool| step_clipped(scaler, poison, None);
    // The first step at a scale is checked before it is taken; its gradients unscaled.
    let (grads, got) = step(&mut scaler, false);
    assert_eq!(got, (false, true, None));
    let unscaled = vals(grads.get::<2>(lora_a).unwrap());
    for (g, w) in unscaled.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1e-3),
            "unscaled {g} vs {w}"
        );
    }
    // With a max norm (a tenth of the norm), clipped in the same pass: as clip_grad_norm clips
    // the unscaled pass's gradients.
    let mut clipped = GradientsParams::from_grads(m.loss(ids.clone()).backward(), &m);
    let norm = clip_grad_norm(&m, &mut clipped, 1.0).unwrap();
    let max_norm = vals(norm)[0] as f64 / 10.0;
    let mut clipped = GradientsParams::from_grads(m.loss(ids.clone()).backward(), &m);
    clip_grad_norm(&m, &mut clipped, max_norm);
    let (grads, got) = step_clipped(&mut LossScaler::new(1024.0, 2), false, Some(max_norm));
    assert_eq!(got, (false, true, None));
    let (got, want) = (
        grads.get::<2>(lora_a).unwrap(),
        clipped.get::<2>(lora_a).unwrap(),
    );
    for (g, w) in vals(got).iter().zip(&vals(want)) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1e-4),
            "clipped {g} vs {w}"
        );
    }
    // An overflow at a scale that passed: taken at once with zeroed gradients, found when its
    // flag is read with its loss; the scale halved.
    let (grads, got) = step(&mut scaler, true);
    assert_eq!(got, (true, true, Some(1024.0)));
    for id in [lora_a, m.fc1.lora_b.as_ref().unwrap().id] {
        assert!(vals(grads.get::<2>(id).unwrap()).iter().all(|&v| v == 0.0));
    }
    assert_eq!(scaler.scale(), 512.0);
    // An overflow at a new scale: checked first and skipped, the scale halved.
    assert_eq!(step(&mut scaler, true).1, (false, false, None));
    assert_eq!(scaler.scale(), 256.0);
    // Two good steps in a row double it; the second is taken before its flag is read.
    assert_eq!(step(&mut scaler, false).1, (false, true, None));
    assert_eq!(scaler.scale(), 256.0);
    assert_eq!(step(&mut scaler, false).1, (true, true, None));
    assert_eq!(scaler.scale(), 512.0);
    // Reads finished after the next step is queued (at a scale a step passed): the losses read
    // back, the scale doubled when the second good step in a row is read.
    assert_eq!(step(&mut scaler, false).1, (false, true, None));
    let (scale, loss) = (scaler.scale(), m.loss(ids.clone()));
    let mut grads = GradientsParams::from_grads(loss.clone().mul_scalar(scale).backward(), &m);
    assert!(scaler.unscale(&m, &mut grads, None));
    let first = scaler.settle_start(loss.clone().inner().reshape([1]));
    let loss2 = m.loss(ids.clone()).mul_scalar(2.0);
    let mut grads = GradientsParams::from_grads(loss2.clone().mul_scalar(scale).backward(), &m);
    assert!(scaler.unscale(&m, &mut grads, None));
    let second = scaler.settle_start(loss2.clone().inner().reshape([1]));
    // Started reads are eager: under Burn's default runtime kind a GPU read's copy would wait
    // for the bytes' first access, in `settle_finish`, behind the work queued since.
    assert_eq!(burn_std::runtime_kind(), burn_std::RuntimeKind::Async);
    let (a, b) = (scaler.settle_finish(first), scaler.settle_finish(second));
    assert_eq!(a.loss, vals(loss.inner())[0] as f64);
    assert_eq!(b.loss, vals(loss2.inner())[0] as f64);
    assert_eq!(
        (a.take, b.take, a.late_overflow, b.late_overflow),
        (true, true, None, None)
    );
    assert_eq!(scaler.scale(), 1024.0);
}

#[test]
fn clip_grad_norm_is_global() {
    let d = Device::flex().autodiff();
    d.seed(5);
    let m = tiny(&d);
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 6], [2, 2]), &d);
    let loss = m.loss(ids).mul_scalar(1000.0);
    let mut grads = GradientsParams::from_grads(loss.backward(), &m);
    let g_before: Vec<f32> = vals(grads.get::<2>(m.fc1.weight.id).unwrap());
    let sq = |g: &GradientsParams| -> f32 {
        let mut s = 0.0;
        for id in [m.fc1.weight.id, m.fc2.weight.id, m.emb.weight.id] {
            s += vals(g.get::<2>(id).unwrap())
                .iter()
                .map(|v| v * v)
                .sum::<f32>();
        }
        for id in [
            m.fc1.bias.as_ref().unwrap().id,
            m.fc2.bias.as_ref().unwrap().id,
        ] {
            s += vals(g.get::<1>(id).unwrap())
                .iter()
                .map(|v| v * v)
                .sum::<f32>();
        }
        for p in [&m.fc1.lora_a, &m.fc1.lora_b, &m.emb.lora_a, &m.emb.lora_b] {
            if let Some(g) = g.get::<2>(p.as_ref().unwrap().id) {
                s += vals(g).iter().map(|v| v * v).sum::<f32>();
            }
        }
        s
    };
    let norm_manual = sq(&grads).sqrt();
    let norm = clip_grad_norm(&m, &mut grads, 1.0)
        .unwrap()
        .into_scalar::<f32>();
    assert!((norm - norm_manual).abs() / norm_manual < 1e-5);
    assert!(norm > 1.0);
    let after = sq(&grads).sqrt();
    assert!((after - 1.0).abs() < 1e-4, "clipped norm {after}");
    let coef = 1.0 / (norm + 1e-6);
    let g_after: Vec<f32> = vals(grads.get::<2>(m.fc1.weight.id).unwrap());
    for (b, a) in g_before.iter().zip(&g_after) {
        assert!((b * coef - a).abs() <= 1e-6 * b.abs().max(1.0));
    }
}

/// `dropout::masked` is `x * mask`, values and input gradient bit for bit, with the mask kept as
/// it is (few elements) and packed to bits (`[4, 16, 1024]`: 65,536), in `dtype`.
fn masked_case(d: &Device, dtype: burn::tensor::DType, shapes: &[[usize; 3]]) {
    d.seed(3);
    for &shape in shapes {
        let random = |law| Tensor::<3>::random(shape, law, d).cast(dtype);
        let normal = || random(Distribution::Normal(0.0, 1.0));
        let (x, w) = (normal(), normal());
        let mask = random(Distribution::Bernoulli(0.9)).mul_scalar(1.0 / 0.9);
        let run = |fused: bool| {
            let xi = x.clone().require_grad();
            let y = match fused {
                true => dropout::masked(xi.clone(), mask.clone(), 0.9),
                false => xi.clone() * mask.clone(),
            };
            let grads = (y.clone() * w.clone()).sum().backward();
            let g = xi.grad(&grads).expect("a gradient");
            let f32s = |t: Tensor<3>| vals(t.cast(burn::tensor::DType::F32));
            (f32s(y), f32s(g))
        };
        let ((y0, g0), (y1, g1)) = (run(false), run(true));
        if y0.len() >= 1024 {
            assert!(
                y0.contains(&0.0) && y0.iter().any(|&v| v != 0.0),
                "a mask of one value"
            );
        }
        assert_eq!(y0, y1, "values, {shape:?}, {dtype:?}, {d:?}");
        assert_eq!(g0, g1, "gradients, {shape:?}, {dtype:?}, {d:?}");
    }
}

#[test]
fn masked_is_x_times_mask() {
    for d in backends() {
        masked_case(
            &d.autodiff(),
            burn::tensor::DType::F32,
            &[[2, 3, 5], [4, 16, 1024]],
        );
    }
}

/// `matmul::matmul` against Burn's matmul, values and both gradients (w trained) or the input
/// gradient alone (w frozen), at a size flex runs on one thread and one it splits.
fn matmul_case(d: &Device) {
    d.seed(4);
    // 4096 × 24 × 8: the W gradient split over the rows on cubecl (`Matmul::mm_tn`).
    for (rows, d_in, d_out) in [(19, 7, 5), (256, 192, 200), (4096, 24, 8)] {
        let normal = |s: [usize; 2]| Tensor::<2>::random(s, Distribution::Normal(0.0, 1.0), d);
        let (x, w, g) = (
            normal([rows, d_in]),
            normal([d_in, d_out]),
            normal([rows, d_out]),
        );
        for train_w in [true, false] {
            let run = |ours: bool| {
                let xi = x.clone().require_grad();
                let wi = if train_w {
                    w.clone().require_grad()
                } else {
                    w.clone()
                };
                let y = match ours {
                    true => matmul::matmul(xi.clone(), wi.clone()),
                    false => xi.clone().matmul(wi.clone()),
                };
                let grads = (y.clone() * g.clone()).sum().backward();
                (y, xi.grad(&grads).unwrap(), wi.grad(&grads))
            };
            let ((y0, x0, w0), (y1, x1, w1)) = (run(false), run(true));
            let what = format!("{rows}x{d_in}x{d_out}, train w {train_w}, {d:?}");
            assert!(max_abs(y0, y1) < 1e-4, "values, {what}");
            let e = max_abs(x0, x1);
            assert!(e < 1e-4, "x gradient {e}, {what}");
            match (w0, w1) {
                (Some(a), Some(b)) => assert!(max_abs(a, b) < 1e-3, "w gradient, {what}"),
                (None, None) => assert!(!train_w),
                _ => panic!("w gradient on one side only, {what}"),
            }
        }
    }
}

#[test]
fn matmul_is_burns_matmul() {
    for d in backends() {
        matmul_case(&d.autodiff());
    }
}

/// Flex's `Matmul::mm` on strided views (transposed, permuted batch dims, an offset) and batched
/// inputs: Flex's own product, bit for bit (the same `gemm` calls).
#[test]
fn flex_mm_takes_strided_views() {
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::{Flex, tensor::FloatTensor};
    use burn::tensor::Slice;
    use matmul::Matmul;
    let d = dev();
    let prim = |s: [usize; 4]| -> FloatTensor<Flex> {
        let t = Tensor::<4>::random(s, Distribution::Normal(0.0, 1.0), &d);
        Flex::float_from_data(t.into_data(), &Default::default())
    };
    let a = Flex::float_swap_dims(prim([2, 5, 3, 4]), 1, 2); // [2, 3, 5, 4], strided
    let b = Flex::float_swap_dims(prim([2, 3, 6, 4]), 2, 3); // [2, 3, 4, 6], transposed
    let rows = [
        Slice::full(),
        Slice::full(),
        Slice::from(2..6),
        Slice::full(),
    ];
    let c = Flex::float_slice(prim([2, 3, 7, 6]), &rows); // [2, 3, 4, 6] at an offset
    for (l, r) in [(a.clone(), b), (a, c)] {
        let ours = Flex::mm(l.clone(), r.clone()).into_data();
        let flex = Flex::float_matmul(l, r).into_data();
        assert_eq!(ours.shape(), flex.shape());
        assert_eq!(
            ours.as_slice::<f32>().unwrap(),
            flex.as_slice::<f32>().unwrap()
        );
    }
}

/// Flex's host `MaskBits` against Burn's tensor ops: the same words, Burn's ops rebuild the mask from
/// them, and flex's multiply by the bits is `x * mask`; on a contiguous mask and a strided view.
/// The packed mask in f16 on a wgpu device with f16 (a GPU): `masked` is `x * mask` bit for
/// bit. Mesa's llvmpipe has no f16: there the test says so and checks nothing.
#[test]
fn masked_in_f16_on_wgpu() {
    use burn::tensor::DType;
    let d = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice).autodiff();
    if !d.supports_dtype(DType::F16) {
        eprintln!("masked_in_f16_on_wgpu: this wgpu device has no f16; nothing checked");
        return;
    }
    masked_case(&d, DType::F16, &[[4, 16, 1024]]);
}

#[test]
fn flex_mask_bits_match_burn_ops() {
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::{Flex, TensorMetadata};
    use burn::tensor::FloatDType;
    use dropout::MaskBits;
    let d = dev();
    let shape = [3, 2, 1 << 15];
    let mask = Tensor::<3>::random(shape, Distribution::Bernoulli(0.9), &d).mul_scalar(1.0 / 0.9);
    let mask = Flex::float_from_data(mask.into_data(), &Default::default());
    for m in [mask.clone(), Flex::float_swap_dims(mask, 0, 1)] {
        let ours = Flex::pack_bits(m.clone());
        let burn = dropout::burn_pack::<Flex>(m.clone());
        assert_eq!(ours.shape(), burn.shape());
        let words = ours.clone().into_data().convert::<i32>();
        assert_eq!(words, burn.into_data().convert::<i32>());
        let kept = words.iter::<i32>().map(|w| w.count_ones()).sum::<u32>() as f64;
        assert!((kept / (3 << 16) as f64 - 0.9).abs() < 0.01, "kept {kept}");
        // Burn's ops rebuild the mask itself; flex multiplies by the bits as `x * mask` does.
        let (s, v) = (m.shape(), 1.0 / 0.9);
        let back = dropout::burn_unpack::<Flex>(ours.clone(), s.clone(), v, FloatDType::F32);
        assert_eq!(back.clone().into_data(), m.into_data());
        let x = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &d).into_data();
        let x = Flex::float_reshape(Flex::float_from_data(x, &Default::default()), s);
        let ours = Flex::mul_bits(x.clone(), ours, v).into_data();
        assert_eq!(ours, Flex::float_mul(x, back).into_data());
    }
}

/// `dropout::hashed` is `x * mask` for the mask `hashed_kept` draws on the host (values and input
/// gradient bit for bit), the dropped share is `1 − keep`, and another seed gives another mask; on
/// flex, ndarray and wgpu.
#[test]
fn hashed_dropout_is_x_times_the_host_mask() {
    use dropout::{hashed, hashed_kept};
    for d in backends() {
        let d = d.autodiff();
        d.seed(9);
        let shape = [4, 8, 300];
        let x = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &d);
        let w = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &d);
        let seeds = [[0.25f32, 0.7], [0.125, 0.5]];
        let mut masks = Vec::new();
        for u in seeds {
            let seed = Tensor::<1>::from_floats(u, &d);
            let s = u.map(|v| (v * 16_777_216.0) as u32);
            let value = (1.0f64 / 0.9) as f32;
            let mask: Vec<f32> = (0..x.shape().num_elements())
                .map(|i| match hashed_kept(i / 300, i % 300, s, 0.9) {
                    true => value,
                    false => 0.0,
                })
                .collect();
            let host = Tensor::<3>::from_data(TensorData::new(mask.clone(), shape), &d);
            let xi = x.clone().require_grad();
            let y = hashed(xi.clone(), seed, 0.9);
            let g = xi.grad(&(y.clone() * w.clone()).sum().backward()).unwrap();
            assert_eq!(vals(y), vals(x.clone() * host.clone()), "values on {d:?}");
            assert_eq!(vals(g), vals(w.clone() * host), "gradient on {d:?}");
            let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
            assert!((dropped - 0.1).abs() < 0.01, "dropped share {dropped}");
            masks.push(mask);
        }
        assert_ne!(masks[0], masks[1]);
        // Rows differ from each other (the row key), and so do columns of a row.
        let m = &masks[0];
        assert_ne!(m[..300], m[300..600]);
    }
}

/// `fused::lora_linear` (values and the gradients of x, W, bias, A and B) against the same
/// formula in Burn's tensor ops with `dropout::hashed`: on flex and ndarray Burn's ops inside the
/// op, on wgpu the adapter kernels (`kernels.rs`: 32- and 128-unit rows, two column cubes at 260).
#[test]
fn fused_lora_linear_matches_the_formula() {
    // (rows as [batch, seq], k, n, r, bias, keep, train W and bias)
    // Small products: larger ones ran cubecl's matmul autotune for minutes on Mesa's llvmpipe.
    let cases = [
        ([1, 19], 50, 70, 3, true, 0.9, false),
        ([2, 8], 300, 20, 8, true, 0.8, true),
        ([1, 5], 20, 260, 4, false, 1.0, false),
        ([1, 7], 20, 9, 1, true, 1.0, true),
        // Rank 16: two columns a unit in the up kernel; rank 40: Burn's ops on wgpu too.
        ([1, 6], 40, 30, 16, true, 0.9, false),
        ([1, 3], 24, 10, 40, true, 0.9, false),
        // Rows of 1100: 128 units.
        ([1, 4], 1100, 12, 8, true, 0.9, false),
        // Rows of 8-wide vectors in f16 (4-wide in f32, two vectors a unit in the up kernel).
        ([2, 5], 96, 48, 8, true, 0.9, true),
    ];
    use burn::tensor::DType;
    // f32 everywhere; f16 too on a wgpu device that has it (a GPU; not llvmpipe).
    let mut runs: Vec<(Device, DType, f32)> = backends().map(|d| (d, DType::F32, 2e-5)).into();
    let gpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    if gpu.supports_dtype(DType::F16) {
        runs.push((gpu, DType::F16, 2e-2));
    }
    for (d, dtype, tol) in runs {
        let d = d.autodiff();
        d.seed(11);
        for ([bs, t], k, n, r, with_bias, keep, train_w) in cases {
            let normal = |s: Vec<usize>| {
                Tensor::<3>::random(
                    [1, 1, s.iter().product()],
                    Distribution::Normal(0.0, 1.0),
                    &d,
                )
                .cast(dtype)
            };
            let x = normal(vec![bs, t, k]).reshape([bs, t, k]);
            let w = normal(vec![k, n]).reshape([k, n]);
            let bias = normal(vec![n]).reshape([n]);
            let a = normal(vec![r, k]).reshape([r, k]);
            let b = normal(vec![n, r]).reshape([n, r]);
            let g = normal(vec![bs, t, n]).reshape([bs, t, n]);
            let seed = Tensor::<1>::from_floats([0.375f32, 0.8125], &d);
            let s = 1.7;
            let run = |ours: bool| {
                let xi = x.clone().require_grad();
                let track = |t: Tensor<2>| if train_w { t.require_grad() } else { t };
                let wi = track(w.clone());
                let bi = match train_w {
                    true => bias.clone().require_grad(),
                    false => bias.clone(),
                };
                let (ai, bbi) = (a.clone().require_grad(), b.clone().require_grad());
                let bias_in = with_bias.then(|| bi.clone());
                let seed_in = (keep < 1.0).then(|| seed.clone());
                let y = match ours {
                    true => fused::lora_linear(
                        xi.clone(),
                        wi.clone(),
                        bias_in,
                        ai.clone(),
                        bbi.clone(),
                        seed_in,
                        keep,
                        s,
                    ),
                    false => {
                        // 2-D products (Burn's batched products hung in cubecl's autotune on
                        // Mesa's llvmpipe at these shapes).
                        let x2 = xi.clone().reshape([bs * t, k]);
                        let xd = match seed_in {
                            Some(seed) => dropout::hashed(x2.clone(), seed, keep),
                            None => x2.clone(),
                        };
                        let base = x2.matmul(wi.clone());
                        let base = match bias_in {
                            Some(b) => base + b.unsqueeze(),
                            None => base,
                        };
                        let xa = xd.matmul(ai.clone().transpose()).mul_scalar(s);
                        (base + xa.matmul(bbi.clone().transpose())).reshape([bs, t, n])
                    }
                };
                let grads = (y.clone() * g.clone()).sum().backward();
                let grad2 = |t: &Tensor<2>| t.grad(&grads);
                (
                    y,
                    xi.grad(&grads).unwrap(),
                    [grad2(&wi), grad2(&ai), grad2(&bbi)],
                    bi.grad(&grads),
                )
            };
            let ((y0, x0, m0, b0), (y1, x1, m1, b1)) = (run(false), run(true));
            let what = format!("[{bs}, {t}, {k}] -> {n}, r {r}, keep {keep}, {dtype:?} on {d:?}");
            // Relative to the largest magnitude (the sums run in another order).
            let close = |p: Tensor<2>, q: Tensor<2>, name: &str| {
                let (p, q) = (p.cast(DType::F32), q.cast(DType::F32));
                let e = max_abs(p.clone(), q.clone()) / q.abs().max().into_scalar::<f32>();
                assert!(e < tol, "{name}: relative error {e}, {what}");
            };
            close(y0.reshape([bs * t, n]), y1.reshape([bs * t, n]), "values");
            close(
                x0.reshape([bs * t, k]),
                x1.reshape([bs * t, k]),
                "x gradient",
            );
            for (name, (p, q)) in ["W", "A", "B"].into_iter().zip(m0.into_iter().zip(m1)) {
                match (p, q) {
                    (Some(p), Some(q)) => close(p, q, name),
                    (None, None) => assert!(name == "W" && !train_w, "{name}: no gradient, {what}"),
                    _ => panic!("{name} gradient on one side only, {what}"),
                }
            }
            match (b0, b1) {
                (Some(p), Some(q)) => close(p.unsqueeze(), q.unsqueeze(), "bias gradient"),
                (None, None) => assert!(!train_w || !with_bias),
                // Our op never reads an unused bias: no gradient there.
                (Some(_), None) => assert!(!with_bias),
                _ => panic!("bias gradient on our side only, {what}"),
            }
        }
    }
}

/// LoRA's thin weight gradients on cubecl (`AdapterKernels::thin_tn`, through which `Matmul::mm_tn`
/// runs `xᵀ·dy` for x `[rows, ≤ 16]`) against flex's product: no rows (zeros), rows not a multiple
/// of the kernel's parts, widths down to one column, an `a` read through a transposed view, a
/// non-contiguous `b`.
#[test]
fn thin_tn_matches_flex() {
    use crate::kernels::AdapterKernels;
    use burn::backend::Dispatch;
    let gpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    let flex = Device::flex();
    flex.seed(5);
    let normal = Distribution::Normal(0.0, 1.0);
    let on = |t: Tensor<2>| Tensor::<2>::from_data(t.into_data(), &gpu).into_dispatch();
    let check = |a: Tensor<2>, b: Tensor<2>, what: &str| {
        let expect = a.clone().transpose().matmul(b.clone());
        let got = Tensor::<2>::from_dispatch(<Dispatch as AdapterKernels>::thin_tn(on(a), on(b)));
        let got = Tensor::<2>::from_data(got.into_data(), &flex);
        assert_eq!(got.dims(), expect.dims(), "{what}");
        let scale = expect.clone().abs().max().into_scalar::<f32>().max(1.0);
        let diff = max_abs(got, expect) / scale;
        assert!(diff < 1e-5, "{what}: differs by {diff} (relative)");
    };
    for (rows, m, n) in [
        (1000, 8, 768),
        (300, 3, 20),
        (257, 16, 30),
        (130, 1, 7),
        (128, 2, 64),
    ] {
        let a = Tensor::<2>::random([rows, m], normal, &flex);
        let b = Tensor::<2>::random([rows, n], normal, &flex);
        let what = format!("[{rows}, {m}]ᵀ · [{rows}, {n}]");
        check(a.clone(), b.clone(), &what);
        let at = Tensor::<2>::random([m, rows], normal, &flex);
        check(
            at.transpose(),
            b.clone(),
            &format!("{what}, a a transposed view"),
        );
        let bt = Tensor::<2>::random([n, rows], normal, &flex);
        check(a, bt.transpose(), &format!("{what}, b a transposed view"));
    }
}

/// The f32 product kernel ([`crate::gemm`]) on wgpu against flex's matmul: every operand layout
/// (row-major, a transposed view of either), sizes that leave partial tiles, batches with a
/// permuted view, an output width that is not a multiple of 4, a reduction split in parts, and a k
/// that falls back to Burn's.
#[test]
fn gemm_matches_flex() {
    use crate::gemm::GemmKernels;
    use burn::backend::Dispatch;
    let gpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    let flex = Device::flex();
    flex.seed(3);
    let normal = Distribution::Normal(0.0, 1.0);
    let gemm = |a: Tensor<4>, b: Tensor<4>| {
        let on = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &gpu).into_dispatch();
        Tensor::<4>::from_dispatch(<Dispatch as GemmKernels>::gemm(on(a), on(b)))
    };
    let check = |a: Tensor<4>, b: Tensor<4>, what: &str| {
        let expect = a.clone().matmul(b.clone());
        let got = Tensor::<4>::from_data(gemm(a, b).into_data(), &flex);
        assert_eq!(got.dims(), expect.dims(), "{what}");
        // Relative to the largest value: sums over k terms, in an order that depends on the tile.
        let scale = expect.clone().abs().max().into_scalar::<f32>().max(1.0);
        let diff = max_abs(got, expect) / scale;
        assert!(diff < 1e-5, "{what}: differs by {diff} (relative)");
    };
    // (72, 1024, 40) and (40, 1024, 36): a long k over few output tiles, the second one tile, whose
    // reduction is split in parts even where the device reports one SM (Mesa's llvmpipe).
    let sizes = [
        (200, 48, 136),
        (130, 32, 260),
        (8, 16, 4),
        (260, 64, 50),
        (64, 20, 64),
        (72, 1024, 40),
        (40, 1024, 36),
    ];
    for (m, k, n) in sizes {
        let a = Tensor::<4>::random([1, 1, m, k], normal, &flex);
        let at = Tensor::<4>::random([1, 1, k, m], normal, &flex);
        let b = Tensor::<4>::random([1, 1, k, n], normal, &flex);
        let bt = Tensor::<4>::random([1, 1, n, k], normal, &flex);
        let what = format!("[{m}, {k}] · [{k}, {n}]");
        check(a.clone(), b.clone(), &format!("{what}, row-major"));
        check(
            a.clone(),
            bt.clone().swap_dims(2, 3),
            &format!("{what}, a · bᵀ"),
        );
        check(at.clone().swap_dims(2, 3), b, &format!("{what}, aᵀ · b"));
        check(
            at.swap_dims(2, 3),
            bt.swap_dims(2, 3),
            &format!("{what}, aᵀ · bᵀ"),
        );
    }
    // Batches: heads as a permuted view ([b, t, h, d] -> [b, h, t, d]).
    let q = Tensor::<4>::random([2, 96, 3, 32], normal, &flex).swap_dims(1, 2);
    let kt = Tensor::<4>::random([2, 3, 32, 80], normal, &flex);
    check(q.clone(), kt, "batched q · k");
    check(q.clone(), q.clone().swap_dims(2, 3), "batched q · qᵀ");
    // A batch dim of 1 broadcasts, on either side.
    let k1 = Tensor::<4>::random([1, 3, 32, 80], normal, &flex);
    check(
        q.clone(),
        k1.clone(),
        "q · k, k's first batch dim broadcast",
    );
    let w = Tensor::<4>::random([2, 1, 32, 48], normal, &flex);
    check(q.clone(), w, "q · w, w's second batch dim broadcast");
}

/// [`crate::FusedAdamW`] takes Burn's AdamW steps (one kernel a parameter on wgpu, Burn's ops on
/// the host backends), and its state loads into Burn's AdamW (a checkpoint of either resumes
/// with the other).
#[test]
fn fused_adamw_matches_burns() {
    use burn::optim::ModuleOptimizer;
    let burns = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(0.01);
    let fused = crate::FusedAdamW {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.01,
    };
    for base in backends() {
        let d = base.clone().autodiff();
        d.seed(9);
        let m0 = tiny(&d);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 6], [2, 2]), &d);
        let run = |mut m: Tiny, mut optim: ModuleOptimizer, steps: usize| {
            for _ in 0..steps {
                let grads = GradientsParams::from_grads(m.loss(ids.clone()).backward(), &m);
                m = optim.step(1e-2, m, grads);
            }
            (m, optim)
        };
        let (want, _) = run(m0.clone(), burns.init(), 6);
        let (got, _) = run(m0.clone(), fused.init(), 6);
        let (half, optim) = run(m0.clone(), fused.init(), 3);
        let (resumed, _) = run(half, burns.init().load_record(optim.to_record()), 3);
        let want = crate::params_by_path(&want, |_, _| true);
        for other in [got, resumed] {
            for ((path, _, w), (_, _, g)) in
                want.iter().zip(crate::params_by_path(&other, |_, _| true))
            {
                let diff = w
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-5, "{base:?} {path}: {diff}");
            }
        }
    }
}

/// CPU backends state no binding limit; a cubecl device does (its autodiff device too), and
/// [`check_buffers`] names the first buffer above it.
#[test]
fn binding_limit_names_the_first_buffer_above_it() {
    assert_eq!(max_binding_bytes(&Device::flex()), None);
    assert!(check_buffers(&[("any".into(), u64::MAX)], &Device::flex()).is_ok());
    let gpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    let limit = max_binding_bytes(&gpu).expect("a cubecl device states its limit");
    assert_eq!(max_binding_bytes(&gpu.clone().autodiff()), Some(limit));
    assert!(check_buffers(&[("at the limit".into(), limit)], &gpu).is_ok());
    let buffers = [
        ("small".to_string(), 1),
        ("`big` [2]".to_string(), limit + 1),
        ("bigger".to_string(), u64::MAX),
    ];
    let e = check_buffers(&buffers, &gpu).unwrap_err();
    assert_eq!(
        (e.what.as_str(), e.bytes, e.limit),
        ("`big` [2]", limit + 1, limit)
    );
    assert!(e.to_string().starts_with("`big` [2] takes "), "{e}");
}
