//! Both routes for a model written only with `burn::nn`: drop-in types and `inject`.

use crate::inject::{adapted_modules, adapter_tensors, load_adapter, merge, save_adapter};
use crate::utils::{ValuesByPath, load_params_by_path, params_by_path};
use crate::*;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::store::ModuleRecord;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use std::path::PathBuf;

#[derive(Module, Debug)]
struct Block {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// A model the LoRA code knows nothing about.
#[derive(Module, Debug)]
struct Net {
    emb: Embedding,
    blocks: Vec<Block>,
    fc10: Linear,
    head: Linear,
}

impl Net {
    fn new(d: &Device) -> Self {
        let block = || Block {
            norm: LayerNormConfig::new(8).init(d),
            fc1: LinearConfig::new(8, 16).init(d),
            fc2: LinearConfig::new(16, 8).init(d),
        };
        Net {
            emb: EmbeddingConfig::new(11, 8).init(d),
            blocks: vec![block(), block()],
            fc10: LinearConfig::new(8, 8).init(d),
            head: LinearConfig::new(8, 5).init(d),
        }
    }

    /// `[batch, seq]` ids → `[batch, seq, 5]`.
    fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let mut x = self.emb.forward(ids);
        for b in &self.blocks {
            x = x.clone()
                + b.fc2.forward(burn::tensor::activation::gelu(
                    b.fc1.forward(b.norm.forward(x)),
                ));
        }
        self.head.forward(self.fc10.forward(x).tanh())
    }
}

fn ids(d: &Device) -> Tensor<2, Int> {
    Tensor::from_data(
        TensorData::new(vec![1i64, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 3], [2, 6]),
        d,
    )
}

fn max_abs<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

fn cfg(rank: usize, targets: &[&str]) -> InjectConfig {
    InjectConfig::new(rank, 2.0 * rank as f64)
        .with_targets(targets)
        .unwrap()
}

/// Random values for every `B` so the adapters do something.
fn randomize_b<M: Module>(model: M, seed: u64) -> M {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let values: ValuesByPath = params_by_path(&model, |p, _| p.ends_with(".lora.b"))
        .into_iter()
        .map(|(p, shape, v)| {
            let v = v
                .iter()
                .map(|_| rand::Rng::random_range(&mut rng, -0.5f32..0.5))
                .collect();
            (p, (shape, v))
        })
        .collect();
    load_params_by_path(model, &values).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-core-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn targets_by_name_glob_regex_and_all_linear() {
    let d = Device::flex();
    let modules = |t: &[&str]| adapted_modules(&inject(Net::new(&d), &cfg(2, t)).unwrap());
    assert_eq!(modules(&["fc1"]), ["blocks.0.fc1", "blocks.1.fc1"]);
    assert_eq!(modules(&["blocks.0.fc1"]), ["blocks.0.fc1"]);
    assert_eq!(
        modules(&["blocks.*.fc?"]),
        [
            "blocks.0.fc1",
            "blocks.0.fc2",
            "blocks.1.fc1",
            "blocks.1.fc2"
        ]
    );
    assert_eq!(modules(&["**fc10"]), ["fc10"]);
    assert_eq!(
        modules(&[r"re:blocks\.1\..*", "head"]),
        ["blocks.1.fc1", "blocks.1.fc2", "head"]
    );
    assert_eq!(
        modules(&["all-linear"]),
        [
            "blocks.0.fc1",
            "blocks.0.fc2",
            "blocks.1.fc1",
            "blocks.1.fc2",
            "fc10",
            "head"
        ]
    );
    // An embedding table is a 2-D weight too.
    assert_eq!(modules(&["emb"]), ["emb"]);
    assert_eq!(
        "re:a|b".parse::<Target>().unwrap().to_string(),
        "re:a|b",
        "targets print as given"
    );
}

#[test]
fn unknown_or_bad_targets_are_errors() {
    let d = Device::flex();
    let err = |c: InjectConfig| inject(Net::new(&d), &c).unwrap_err().to_string();
    let e = err(cfg(2, &["attn"]));
    assert!(
        e.contains("LoRA target 'attn' matches no 2-D weight") && e.contains("blocks.0.fc1"),
        "{e}"
    );
    // Names match whole path segments.
    assert!(err(cfg(2, &["c1"])).contains("'c1' matches no"));
    let e = "re:(".parse::<Target>().unwrap_err().to_string();
    assert!(e.starts_with("bad LoRA target 're:('"), "{e}");
    assert!(err(cfg(0, &["fc1"])).contains("rank must be at least 1"));
    assert!(err(InjectConfig::new(2, 4.0)).contains("no LoRA targets"));
    let e = err(cfg(9, &["fc10"]));
    assert!(
        e.contains("rank 9 is larger than min(d_in, d_out) = 8 of 'fc10.weight'"),
        "{e}"
    );
    let once = inject(Net::new(&d), &cfg(2, &["fc1"])).unwrap();
    let e = inject(once, &cfg(2, &["head"])).unwrap_err().to_string();
    assert!(e.contains("already has a LoRA adapter"), "{e}");
}

#[test]
fn injected_starts_unchanged_and_follows_the_formula() {
    let d = Device::flex();
    d.seed(1);
    let net = Net::new(&d);
    let before = net.forward(ids(&d));
    let c = cfg(3, &["head", "fc1"]).with_scaling(Scaling::RsLora);
    let model = inject(net.clone(), &c).unwrap();
    assert_eq!(
        max_abs(before, model.forward(ids(&d))),
        0.0,
        "B = 0 at first"
    );
    // A ~ U(±1/√d_in).
    let a = model.head.weight.adapter().unwrap().a.val();
    assert_eq!(a.dims(), [8, 3]);
    let amax = a.clone().abs().max().into_scalar::<f32>();
    assert!(amax > 0.0 && amax <= 1.0 / 8f32.sqrt());

    let model = randomize_b(model, 5);
    let ad = model.head.weight.adapter().unwrap();
    assert_eq!(ad.scale, 2.0 * 3.0 / 3f64.sqrt());
    let x = Tensor::<2>::random([4, 8], Distribution::Normal(0.0, 1.0), &d);
    let w = net.head.weight.val();
    let want = x.clone().matmul(w)
        + x.clone()
            .matmul(ad.a.val())
            .matmul(ad.b.val())
            .mul_scalar(ad.scale)
        + net.head.bias.as_ref().unwrap().val().unsqueeze();
    assert!(max_abs(model.head.forward(x), want) < 1e-5);
}

#[test]
fn only_adapters_train_and_merged_equals_unmerged() {
    let d = Device::flex().autodiff();
    d.seed(2);
    let c = cfg(2, &["all-linear"]);
    let model = randomize_b(inject(Net::new(&d), &c).unwrap(), 9);
    let lora: usize = [(8, 16), (16, 8), (8, 16), (16, 8), (8, 8), (8, 5)]
        .iter()
        .map(|(i, o)| 2 * (i + o))
        .sum();
    let base = Net::new(&d).num_params();
    let r = param_report(&model);
    assert_eq!(
        r,
        ParamReport {
            total: base + lora,
            trainable: lora,
            lora
        }
    );

    let before = params_by_path(&model, |_, _| true);
    let loss = model.forward(ids(&d)).powi_scalar(2).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = AdamWConfig::new().init().step(1e-2, model, grads);
    let after = params_by_path(&model, |_, _| true);
    assert_eq!(before.len(), after.len());
    for ((path, _, b), (_, _, a)) in before.iter().zip(&after) {
        if path.contains(".lora.") {
            assert_ne!(b, a, "{path} did not move");
        } else {
            assert_eq!(b, a, "{path} moved");
        }
    }

    let unmerged = model.forward(ids(&d));
    let merged_model = merge(model.clone());
    assert!(adapted_modules(&merged_model).is_empty());
    assert_eq!(merged_model.num_params(), base);
    let merged = merged_model.forward(ids(&d));
    assert!(max_abs(merged, unmerged) <= 1e-5);
}

#[test]
fn adapter_save_and_load() {
    let d = Device::flex();
    d.seed(4);
    let net = Net::new(&d);
    let c = cfg(2, &["fc1", "head"]);
    let trained = randomize_b(inject(net.clone(), &c).unwrap(), 3);
    let keys: Vec<(String, Vec<usize>)> = adapter_tensors(&trained)
        .into_iter()
        .map(|(k, s, _)| (k, s))
        .collect();
    assert_eq!(keys[0], ("blocks.0.fc1.lora_A.weight".into(), vec![2, 8]));
    assert_eq!(keys[1], ("blocks.0.fc1.lora_B.weight".into(), vec![16, 2]));
    assert_eq!(keys.len(), 6);

    let file = tmp("adapter.safetensors");
    save_adapter(&trained, &c, &file).unwrap();
    let fresh = inject(net.clone(), &c).unwrap();
    let loaded = load_adapter(fresh, &c, &file).unwrap();
    assert_eq!(
        max_abs(trained.forward(ids(&d)), loaded.forward(ids(&d))),
        0.0
    );

    let err = |model: Net, c: &InjectConfig, f: &PathBuf| {
        load_adapter(model, c, f).unwrap_err().to_string()
    };
    let name = file.display().to_string();
    let other_alpha = InjectConfig::new(2, 8.0)
        .with_targets(&["fc1", "head"])
        .unwrap();
    let e = err(
        inject(net.clone(), &other_alpha).unwrap(),
        &other_alpha,
        &file,
    );
    assert!(
        e.starts_with(&name) && e.contains("lora_alpha is 4 in the file but 8"),
        "{e}"
    );
    let rank3 = cfg(3, &["fc1", "head"]);
    let mut rank3_file = rank3.clone();
    rank3_file.alpha = 4.0;
    let e = err(inject(net.clone(), &rank3).unwrap(), &rank3_file, &file);
    assert!(e.contains("lora_rank is 2 in the file but 3"), "{e}");
    let only_fc1 = cfg(2, &["fc1"]);
    let e = err(inject(net.clone(), &only_fc1).unwrap(), &only_fc1, &file);
    assert!(e.contains("no adapter for: head.lora_A.weight"), "{e}");
    let e = err(net.clone(), &c, &file);
    assert!(e.contains("inject it first"), "{e}");
    let bytes = std::fs::read(&file).unwrap();
    let cut = tmp("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(inject(net.clone(), &c).unwrap(), &c, &cut);
    assert!(e.contains("not a valid safetensors file"), "{e}");
    let e = err(inject(net, &c).unwrap(), &c, &tmp("missing.safetensors"));
    assert!(e.contains("missing.safetensors"), "{e}");
}

/// The drop-in route: the same model with `LoraLinear` / `LoraEmbedding` fields loads the record
/// the plain `burn::nn` model saved.
#[derive(Module, Debug)]
struct Plain {
    emb: Embedding,
    fc: Linear,
}

#[derive(Module, Debug)]
struct WithLora {
    emb: LoraEmbedding,
    fc: LoraLinear,
}

#[test]
fn drop_in_types_load_a_plain_burn_record() {
    let d = Device::flex();
    d.seed(6);
    let (emb_cfg, fc_cfg) = (EmbeddingConfig::new(11, 8), LinearConfig::new(8, 6));
    let plain = Plain {
        emb: emb_cfg.init(&d),
        fc: fc_cfg.init(&d),
    };
    let file = tmp("plain.bpk");
    plain.clone().save_file(&file).unwrap();

    let lora = WithLora {
        emb: LoraEmbeddingConfig::from(&emb_cfg).with_rank(2).init(&d),
        fc: LoraLinearConfig::from(&fc_cfg)
            .with_rank(2)
            .with_alpha(4.0)
            .init(&d),
    };
    let record = ModuleRecord::load(&file).unwrap().allow_partial(true);
    let lora = lora.try_load_record(record).unwrap();
    let same = |a: Tensor<2>, b: Tensor<2>| a.into_data() == b.into_data();
    assert!(same(plain.fc.weight.val(), lora.fc.weight.val()));
    assert!(same(plain.emb.weight.val(), lora.emb.weight.val()));
    assert_eq!(
        plain.fc.bias.as_ref().unwrap().val().into_data(),
        lora.fc.bias.as_ref().unwrap().val().into_data()
    );
    assert_eq!(lora.fc.rank(), 2);
    let x = plain.emb.forward(ids(&d));
    assert_eq!(
        max_abs(plain.fc.forward(x.clone()), lora.fc.forward(x)),
        0.0
    );
    // Without allow_partial the missing factors are reported, not silently skipped.
    let strict = ModuleRecord::load(&file).unwrap();
    let fresh = WithLora {
        emb: LoraEmbeddingConfig::from(&emb_cfg).with_rank(2).init(&d),
        fc: LoraLinearConfig::from(&fc_cfg).with_rank(2).init(&d),
    };
    assert!(fresh.try_load_record(strict).is_err());
}
