use crate::mingpt::{Gpt, GptConfig, LoraTargets, ids_tensor};
use crate::optim::decay_groups;
use crate::pytorch::{LoadError, load_mingpt};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use lora_core::{LoraMerge, param_report};
use safetensors::SafeTensors;

const FIXTURE: &[u8] = include_bytes!("../tests/fixtures/mingpt_sort_seed0.safetensors");

fn nano(block_size: usize) -> GptConfig {
    GptConfig::from_model_type("gpt-nano", 3, block_size)
        .unwrap()
        .with_lora_rank(8)
        .with_lora_alpha(32.0)
}

fn fixture_f32(key: &str) -> (Vec<f32>, Vec<usize>) {
    let st = SafeTensors::deserialize(FIXTURE).unwrap();
    let v = st.tensor(key).unwrap();
    (
        v.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        v.shape().to_vec(),
    )
}

fn fixture_i64(key: &str) -> (Vec<i64>, [usize; 2]) {
    let st = SafeTensors::deserialize(FIXTURE).unwrap();
    let v = st.tensor(key).unwrap();
    let s = v.shape();
    (
        v.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        [s[0], s[1]],
    )
}

/// Max abs difference; NaN counts as infinitely far.
pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

fn finetuned(device: &Device) -> Gpt {
    load_mingpt(nano(24).init(device), FIXTURE, "fixture", "finetuned/").unwrap()
}

/// Logits of the fine-tuned fixture model on `device` (dropout 0), against PyTorch's.
fn parity_on(device: &Device, tol: f32) {
    let cfg = nano(24)
        .with_embd_pdrop(0.0)
        .with_attn_pdrop(0.0)
        .with_resid_pdrop(0.0);
    let model = load_mingpt(cfg.init(device), FIXTURE, "fixture", "finetuned/").unwrap();
    let (x, shape) = fixture_i64("batch/x");
    let (y, _) = fixture_i64("batch/y");
    let (idx, targets) = (ids_tensor(x, shape, device), ids_tensor(y, shape, device));
    let (logits, loss) = model.forward_loss(idx.clone(), targets.clone());
    let got: Vec<f32> = logits.into_data().iter::<f32>().collect();
    let d = max_diff(&got, &fixture_f32("finetuned_unmerged_nodropout/logits").0);
    assert!(d <= tol, "logits differ by {d}");
    let l = loss.into_scalar::<f32>();
    let expect = fixture_f32("finetuned_unmerged_nodropout/loss").0[0];
    assert!((l - expect).abs() <= tol, "loss {l} vs {expect}");
    // The training loss: head and loss in one op (minGPT's own `lm_head`).
    let l = model.loss(idx, targets).into_scalar::<f32>();
    assert!((l - expect).abs() <= tol, "Gpt::loss {l} vs {expect}");
}

#[test]
fn parity_on_the_training_path() {
    // Autodiff device: the explicit attention (softmax, dropout hook) instead of the fused op.
    parity_on(&Device::flex().autodiff(), 1e-5);
}

#[test]
fn half_precision_stores_frozen_bases_in_f16_with_the_same_results() {
    use burn::tensor::DType;
    let device = Device::flex().autodiff();
    let cfg = nano(24)
        .with_embd_pdrop(0.0)
        .with_attn_pdrop(0.0)
        .with_resid_pdrop(0.0);
    let model = load_mingpt(cfg.init(&device), FIXTURE, "fixture", "finetuned/").unwrap();
    let model = lora_core::mark_only_lora_as_trainable(model);
    let cast_on_use = Gpt {
        f16: true,
        ..model.clone()
    };
    let stored = model.half_precision();
    let (x, shape) = fixture_i64("batch/x");
    let (y, _) = fixture_i64("batch/y");
    let (idx, targets) = (ids_tensor(x, shape, &device), ids_tensor(y, shape, &device));
    let run = |m: &Gpt| {
        let loss = m.loss(idx.clone(), targets.clone());
        let grads = loss.clone().backward();
        let mut out = vec![loss.into_scalar::<f32>()];
        for b in &m.h {
            for l in [&b.attn.c_attn, &b.attn.c_proj, &b.mlp.c_fc, &b.mlp.c_proj] {
                assert_eq!(
                    l.weight.val().dtype(),
                    m.h[0].attn.c_attn.weight.val().dtype()
                );
                for p in [&l.lora_a, &l.lora_b].into_iter().flatten() {
                    assert_eq!(p.val().dtype(), DType::F32, "LoRA factors stay f32");
                    out.extend(p.val().grad(&grads).unwrap().into_data().iter::<f32>());
                }
            }
        }
        out
    };
    assert_eq!(stored.h[0].attn.c_attn.weight.val().dtype(), DType::F16);
    assert_eq!(
        cast_on_use.h[0].attn.c_attn.weight.val().dtype(),
        DType::F32
    );
    let (a, b) = (run(&cast_on_use), run(&stored));
    assert!(a.len() > 1 && a[0].is_finite());
    assert_eq!(a, b, "loss and LoRA gradients bit for bit");
}

#[test]
fn parity_on_ndarray() {
    #[allow(deprecated)]
    parity_on(&Device::ndarray(), 1e-5);
}

#[test]
fn parity_on_wgpu() {
    let _one = crate::WGPU.lock();
    // CPU-only machines run this through Mesa's llvmpipe.
    parity_on(&Device::wgpu(burn::tensor::DeviceKind::DefaultDevice), 1e-4);
}

#[test]
fn pytorch_fixture_parity_unmerged_and_merged() {
    let device = Device::flex();
    let model = finetuned(&device);
    let (x, shape) = fixture_i64("batch/x");
    let (y, _) = fixture_i64("batch/y");
    let (logits, loss) = model.forward_loss(
        ids_tensor(x.clone(), shape, &device),
        ids_tensor(y, shape, &device),
    );
    let (expect, eshape) = fixture_f32("finetuned_unmerged_nodropout/logits");
    assert_eq!(logits.dims().to_vec(), eshape);
    let got: Vec<f32> = logits.into_data().iter::<f32>().collect();
    let d = max_diff(&got, &expect);
    assert!(d <= 1e-5, "unmerged logits differ by {d}");
    let (expect_loss, _) = fixture_f32("finetuned_unmerged_nodropout/loss");
    let l = loss.into_scalar::<f32>();
    assert!(
        (l - expect_loss[0]).abs() <= 1e-5,
        "loss {l} vs {}",
        expect_loss[0]
    );

    let merged = model.eval();
    let got: Vec<f32> = merged
        .forward(ids_tensor(x, shape, &device))
        .into_data()
        .iter::<f32>()
        .collect();
    let (expect, _) = fixture_f32("finetuned_merged_eval/logits");
    let d = max_diff(&got, &expect);
    assert!(d <= 1e-5, "merged logits differ by {d}");
}

#[test]
fn merged_equals_unmerged_and_roundtrip() {
    let device = Device::flex();
    let model = finetuned(&device);
    let (x, shape) = fixture_i64("batch/x");
    let idx = ids_tensor(x, shape, &device);
    let w0: Vec<f32> = model.h[0]
        .attn
        .c_attn
        .weight
        .val()
        .into_data()
        .iter::<f32>()
        .collect();
    let a: Vec<f32> = model
        .forward(idx.clone())
        .into_data()
        .iter::<f32>()
        .collect();
    let merged = model.merge();
    let b: Vec<f32> = merged.forward(idx).into_data().iter::<f32>().collect();
    assert!(max_diff(&a, &b) <= 1e-5);
    let back = merged.merge().unmerge().unmerge();
    let w1: Vec<f32> = back.h[0]
        .attn
        .c_attn
        .weight
        .val()
        .into_data()
        .iter::<f32>()
        .collect();
    assert!(max_diff(&w0, &w1) <= 1e-6);
}

#[test]
fn exercise_parameter_counts() {
    let device = Device::flex().autodiff();
    let model = lora_core::utils::freeze_lora(nano(24).init(&device));
    let r = param_report(&model);
    assert_eq!((r.total, r.trainable, r.lora), (93_264, 86_352, 6_912));
    let r = param_report(&lora_core::mark_only_lora_as_trainable(model));
    assert_eq!((r.total, r.trainable, r.lora), (93_264, 6_912, 6_912));
}

#[test]
fn add_lora_keeps_the_function_and_counts() {
    let device = Device::flex();
    let model = finetuned(&device);
    let (x, shape) = fixture_i64("batch/x");
    let idx = ids_tensor(x, shape, &device);
    let before: Vec<f32> = model
        .forward(idx.clone())
        .into_data()
        .iter::<f32>()
        .collect();
    let t: LoraTargets = "attn,mlp,wpe".parse().unwrap();
    let more = model.add_lora(t, 8, 32.0, 0.0, lora_core::Scaling::AlphaOverRank);
    let after: Vec<f32> = more.forward(idx).into_data().iter::<f32>().collect();
    assert_eq!(before, after);
    assert_eq!(more.wpe.rank(), 8);
    assert_eq!(more.h[2].mlp.c_fc.rank(), 8);
    assert_eq!(more.wte.rank(), 0);
    assert!("attn,bogus".parse::<LoraTargets>().is_err());
}

#[test]
fn optimizer_groups_cover_every_parameter_once() {
    let device = Device::flex();
    let model = GptConfig::from_model_type("gpt-nano", 3, 24)
        .unwrap()
        .init(&device);
    let (decay, no_decay) = decay_groups(&model);
    let mut ids: Vec<_> = decay.iter().chain(&no_decay).map(|(_, id)| *id).collect();
    let n = ids.len();
    ids.sort_by_key(|id| id.val());
    ids.dedup();
    assert_eq!(ids.len(), n, "a parameter is in both groups");
    let mut count = 0;
    model.visit(&mut CountParams(&mut count));
    assert_eq!(n, count, "a parameter is in neither group");
    // minGPT: decay = Linear weights (4 per block + lm_head).
    assert_eq!(decay.len(), 4 * 3 + 1, "{decay:?}");
    assert!(decay.iter().all(|(p, _)| p.ends_with("weight")));
    assert!(no_decay.iter().any(|(p, _)| p == "wte.weight"));
    assert!(no_decay.iter().any(|(p, _)| p == "h.0.ln_1.gamma"));
}

struct CountParams<'a>(&'a mut usize);
impl burn::module::ModuleVisitor for CountParams<'_> {
    fn visit_float<const D: usize>(&mut self, _: &burn::module::Param<Tensor<D>>) {
        *self.0 += 1;
    }
}

#[test]
fn generate_crops_context_and_is_greedy() {
    let device = Device::flex();
    let model = finetuned(&device).eval();
    let prompt = ids_tensor(vec![2, 0, 1, 1, 0, 2, 2, 0, 1, 0], [1, 10], &device);
    let out = model.generate(prompt.clone(), 30, 1.0, false, None);
    assert_eq!(out.dims(), [1, 40]);
    let first: Vec<i64> = out.narrow(1, 0, 20).into_data().iter::<i64>().collect();
    let again: Vec<i64> = model
        .generate(prompt.clone(), 10, 1.0, false, None)
        .into_data()
        .iter::<i64>()
        .collect();
    assert_eq!(first, again, "greedy decoding is deterministic");
    let sampled = model.generate(prompt, 5, 1.0, true, Some(2));
    assert_eq!(sampled.dims(), [1, 15]);
    let s: Vec<i64> = sampled.into_data().iter::<i64>().collect();
    assert!(s.iter().all(|&t| (0..3).contains(&t)));
}

#[test]
fn load_errors_list_every_problem() {
    let device = Device::flex();
    // Wrong width: every tensor mis-shaped, one error naming the file.
    let wrong = GptConfig::new(3, 4, 32, 3, 24)
        .with_lora_rank(8)
        .init(&device);
    let err = load_mingpt(wrong, FIXTURE, "model.safetensors", "finetuned/").unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("model.safetensors: "), "{msg}");
    assert!(
        msg.contains("'finetuned/transformer.wte.weight' has shape [3, 48], expected [3, 32]"),
        "{msg}"
    );
    // Adapters on the MLP that the file does not have.
    let more = nano(24)
        .with_lora_targets("attn,mlp".parse().unwrap())
        .init(&device);
    let msg = load_mingpt(more, FIXTURE, "f", "finetuned/")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing tensor 'finetuned/transformer.h.0.mlp.c_fc.lora_A'"),
        "{msg}"
    );
    assert!(matches!(
        load_mingpt(nano(24).init(&device), b"not safetensors", "f", ""),
        Err(LoadError::Format { .. })
    ));
    let _ = TensorData::new(vec![0f32], [1]);
}
