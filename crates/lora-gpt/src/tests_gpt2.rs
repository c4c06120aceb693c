//! GPT-2 parity with transformers + PEFT (fixtures made by `shared/tools/make_gpt2_fixtures.py`).

use crate::gpt2::{Gpt2Folder, load_peft_adapter};
use crate::mingpt::{Gpt, ids_tensor};
use crate::tests::max_diff;
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use lora_core::LoraMerge;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn micro() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-micro")
}

struct Golden(Vec<u8>);

impl Golden {
    fn open(dir: &Path) -> Self {
        Self(std::fs::read(dir.join("golden.safetensors")).unwrap())
    }
    fn f32(&self, key: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        st.tensor(key)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn ids(&self, key: &str, device: &Device) -> Tensor<2, burn::tensor::Int> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let v = st.tensor(key).unwrap();
        let s = v.shape().to_vec();
        let ids = v
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        ids_tensor(ids, [s[0], s[1]], device)
    }
}

fn losses(dir: &Path) -> serde_json::Value {
    serde_json::from_slice::<serde_json::Value>(&std::fs::read(dir.join("golden.json")).unwrap())
        .unwrap()["losses"]
        .clone()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

fn base(dir: &Path, layout: &str, device: &Device) -> Gpt {
    Gpt2Folder::open(&dir.join(layout))
        .unwrap()
        .load(|c| c, device)
        .unwrap()
}

#[test]
fn base_logits_and_loss_both_layouts() {
    let d = Device::flex();
    let g = Golden::open(&micro());
    let ids = g.ids("input_ids", &d);
    for layout in ["model", "model-hub-layout"] {
        let m = base(&micro(), layout, &d);
        assert!(m.lm_head.is_none(), "head tied to wte");
        let (logits, loss) = m.causal_lm_loss(ids.clone(), ids.clone());
        let diff = max_diff(&values(logits), &g.f32("base_logits"));
        assert!(diff <= 1e-4, "{layout}: base logits differ by {diff}");
        let expect = losses(&micro())["base"].as_f64().unwrap() as f32;
        assert!(
            (loss.into_scalar::<f32>() - expect).abs() <= 1e-5,
            "{layout}: loss"
        );
    }
}

#[test]
fn peft_adapter_logits_merge_and_grads() {
    let d = Device::flex().autodiff();
    let g = Golden::open(&micro());
    let ids = g.ids("input_ids", &d);
    let (m, cfg) =
        load_peft_adapter(base(&micro(), "model", &d), &micro().join("adapter")).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
    let m = lora_core::mark_only_lora_as_trainable(m);
    let (logits, loss) = m.causal_lm_loss(ids.clone(), ids.clone());
    let diff = max_diff(&values(logits.clone()), &g.f32("lora_logits"));
    assert!(diff <= 1e-4, "lora logits differ by {diff}");
    let expect = losses(&micro())["lora"].as_f64().unwrap() as f32;
    assert!((loss.clone().into_scalar::<f32>() - expect).abs() <= 1e-5);

    // The training loss (head and loss as one chunked op, no logits) on the same next tokens.
    let fused = m.causal_loss(ids.clone());
    assert!(
        (fused.clone().into_scalar::<f32>() - expect).abs() <= 1e-5,
        "Gpt::loss"
    );

    // Gradients of both losses w.r.t. every LoRA factor, PEFT's layout.
    for (what, loss) in [("causal_lm_loss", loss), ("loss", fused)] {
        let grads = loss.backward();
        let check = |p: &Option<Param<Tensor<2>>>, key: &str| {
            let got = values(p.as_ref().unwrap().val().grad(&grads).expect(key));
            let expect = g.f32(&format!("grad.{key}"));
            let scale = expect.iter().fold(0f32, |m, v| m.max(v.abs()));
            let rel = max_diff(&got, &expect) / scale;
            assert!(
                rel <= 1e-4,
                "{what}, {key}: grad differs by {rel} relative (max |g| {scale})"
            );
        };
        for (i, b) in m.h.iter().enumerate() {
            for (layer, name) in [
                (&b.attn.c_attn, "attn.c_attn"),
                (&b.attn.c_proj, "attn.c_proj"),
                (&b.mlp.c_fc, "mlp.c_fc"),
                (&b.mlp.c_proj, "mlp.c_proj"),
            ] {
                check(
                    &layer.lora_a,
                    &format!("transformer.h.{i}.{name}.lora_A.weight"),
                );
                check(
                    &layer.lora_b,
                    &format!("transformer.h.{i}.{name}.lora_B.weight"),
                );
            }
        }
    }

    // Merged (no wte adapter here, so PEFT's merge is right too).
    let merged = m.eval();
    let plain = d.clone().without_autodiff();
    let logits = merged.forward(g.ids("input_ids", &plain));
    let diff = max_diff(&values(logits), &g.f32("merged_logits"));
    assert!(diff <= 1e-4, "merged logits differ by {diff}");
}

#[test]
fn greedy_generation_matches_transformers() {
    let d = Device::flex();
    let g = Golden::open(&micro());
    let m = base(&micro(), "model", &d).eval();
    let prompt = g.ids("greedy_prompt", &d);
    let [_, t] = prompt.dims();
    let out: Vec<i64> = m
        .generate(prompt, 16 - t, 1.0, false, None)
        .into_data()
        .iter::<i64>()
        .collect();
    let expect: Vec<i64> = g
        .ids("greedy_output", &d)
        .into_data()
        .iter::<i64>()
        .collect();
    assert_eq!(out, expect);
}

#[test]
fn tied_head_with_wte_lora_merges_without_changing_the_model() {
    let d = Device::flex();
    let g = Golden::open(&micro());
    let ids = g.ids("input_ids", &d);
    let m = base(&micro(), "model", &d).add_lora(
        "c_attn,wte".parse().unwrap(),
        2,
        4.0,
        0.0,
        lora_core::Scaling::RsLora,
    );
    let mut m = m;
    m.wte.lora_b = m
        .wte
        .lora_b
        .map(|p| p.map(|t| t.random_like(burn::tensor::Distribution::Normal(0.0, 0.5))));
    let unmerged = values(m.forward(ids.clone()));
    let merged_model = m.merge();
    assert!(merged_model.lm_head.is_some(), "merge unties the head");
    let merged = values(merged_model.forward(ids.clone()));
    assert!(max_diff(&unmerged, &merged) <= 1e-4);
    let back = merged_model.unmerge();
    assert!(back.lm_head.is_none(), "unmerge ties it again");
    assert!(max_diff(&values(back.forward(ids)), &unmerged) <= 1e-5);
}

/// Made with `make_gpt2_fixtures.py OUT TOK --vocab 512 --targets c_attn,wte --rslora`: rsLoRA
/// scaling and LoRA on the tied token embedding. PEFT's own merge is wrong here (its merged loss
/// 11.48 vs 6.66 unmerged); ours must equal the unmerged model.
#[test]
fn rslora_on_tied_wte_matches_peft_unmerged_and_merges_correctly() {
    let dir = micro().with_file_name("gpt2-micro-wte-rslora");
    let d = Device::flex().autodiff();
    let g = Golden::open(&dir);
    let ids = g.ids("input_ids", &d);
    let (m, cfg) = load_peft_adapter(base(&dir, "model", &d), &dir.join("adapter")).unwrap();
    assert!(cfg.use_rslora);
    assert_eq!(m.wte.scaling, 8.0 / 2.0, "alpha / sqrt(r)");
    let m = lora_core::mark_only_lora_as_trainable(m);
    let (logits, loss) = m.causal_lm_loss(ids.clone(), ids.clone());
    let lora_logits = g.f32("lora_logits");
    let diff = max_diff(&values(logits), &lora_logits);
    assert!(diff <= 1e-4, "lora logits differ by {diff}");
    let expect = losses(&dir)["lora"].as_f64().unwrap() as f32;
    assert!((loss.clone().into_scalar::<f32>() - expect).abs() <= 1e-5);
    let grads = loss.backward();
    for (p, key) in [
        (&m.wte.lora_a, "transformer.wte.lora_embedding_A"),
        (&m.wte.lora_b, "transformer.wte.lora_embedding_B"),
        (
            &m.h[1].attn.c_attn.lora_a,
            "transformer.h.1.attn.c_attn.lora_A.weight",
        ),
        (
            &m.h[1].attn.c_attn.lora_b,
            "transformer.h.1.attn.c_attn.lora_B.weight",
        ),
    ] {
        let got = values(p.as_ref().unwrap().val().grad(&grads).expect(key));
        let expect = g.f32(&format!("grad.{key}"));
        let scale = expect.iter().fold(0f32, |m, v| m.max(v.abs()));
        let rel = max_diff(&got, &expect) / scale;
        assert!(rel <= 1e-4, "{key}: grad differs by {rel} relative");
    }
    let merged = m.eval();
    let plain = d.clone().without_autodiff();
    let merged_logits = values(merged.forward(g.ids("input_ids", &plain)));
    let diff = max_diff(&merged_logits, &lora_logits);
    assert!(
        diff <= 1e-4,
        "our merged model differs from the unmerged one by {diff}"
    );
    assert!(
        max_diff(&merged_logits, &g.f32("merged_logits")) > 1.0,
        "PEFT's merged logits carry its tied-weight bug"
    );
}

/// Write `files` into a fresh temp folder named `name`.
fn temp_folder(name: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-gpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (f, b) in files {
        std::fs::write(dir.join(f), b).unwrap();
    }
    dir
}

#[test]
fn written_adapters_and_merged_folders_load_back_identically() {
    use crate::export::{self, AdapterSpec};
    use lora_core::Scaling;
    let d = Device::flex();
    let g = Golden::open(&micro());
    let ids = g.ids("input_ids", &d);
    for (targets, scaling, alpha) in [
        ("c_attn,c_proj,c_fc", Scaling::AlphaOverRank, 8.0),
        ("c_attn,wte", Scaling::RsLora, 4.0),
        ("attn.c_proj,wpe", Scaling::Alpha, 0.5),
    ] {
        // An adapter with non-zero B everywhere.
        let t = targets.parse().unwrap();
        d.seed(7);
        let mut m = base(&micro(), "model", &d).add_lora(t, 3, alpha, 0.0, scaling);
        m = m.map(&mut RandomB);
        let want = values(m.forward(ids.clone()));
        let plain = values(base(&micro(), "model", &d).forward(ids.clone()));
        assert!(
            max_diff(&want, &plain) > 1e-3,
            "{targets}: the adapter changes the model"
        );
        let spec = AdapterSpec {
            r: 3,
            alpha,
            scaling,
            dropout: 0.0,
            target_modules: t.module_names(),
            base_model: None,
        };
        let dir = temp_folder(
            "adapter",
            &[
                (
                    "adapter_config.json",
                    serde_json::to_vec(&export::peft_adapter_config(&spec)).unwrap(),
                ),
                (
                    "adapter_model.safetensors",
                    export::safetensors_bytes(&export::peft_adapter_tensors(&m)).unwrap(),
                ),
            ],
        );
        let (back, _) = load_peft_adapter(base(&micro(), "model", &d), &dir).unwrap();
        let got = values(back.forward(ids.clone()));
        assert_eq!(got, want, "{targets}: adapter round trip");
        // The merged HF folder: same function, head untied exactly when wte has LoRA.
        let (tensors, tied) = export::gpt2_state(&m);
        assert_eq!(tied, !t.wte, "{targets}");
        let cfg = Gpt2Folder::open(&micro().join("model")).unwrap().config;
        let json = export::gpt2_config_json(&cfg.gpt_config(), None, tied);
        let merged = temp_folder(
            "merged",
            &[
                ("config.json", serde_json::to_vec(&json).unwrap()),
                (
                    "model.safetensors",
                    export::safetensors_bytes(&tensors).unwrap(),
                ),
            ],
        );
        let loaded = base(&merged, "", &d);
        let diff = max_diff(&values(loaded.forward(ids.clone())), &want);
        assert!(diff <= 1e-5, "{targets}: merged folder differs by {diff}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&merged).unwrap();
    }
}

/// Draw every LoRA B from N(0, 0.1) so adapters change the model.
struct RandomB;

impl burn::module::ModuleMapper for RandomB {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
        p.map(|t| {
            let [rows, cols] = [t.dims()[0], *t.dims().last().unwrap()];
            let is_b = D == 2 && cols <= 3 && rows > 3;
            if is_b && t.clone().abs().sum().into_scalar::<f32>() == 0.0 {
                t.random_like(burn::tensor::Distribution::Normal(0.0, 0.1))
            } else {
                t
            }
        })
    }
}

/// Inputs the fuzz targets (`fuzz/`) crashed on, run through the same entry points: each must now
/// be an error naming the file, not a panic. Files: `tests/fixtures/fuzz/<target>-<what>`.
#[test]
fn fuzz_crashes_are_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let device = Device::flex();
    let model = base(&micro(), "model", &device);
    // peft_adapter: u16 LE config length, the config, the safetensors bytes.
    let cases = [(
        "peft_adapter-lora-dropout-5",
        "lora_dropout 5 must be in [0, 1)",
    )];
    for (file, want) in cases {
        let data = std::fs::read(dir.join(file)).unwrap();
        let n = u16::from_le_bytes([data[0], data[1]]) as usize;
        let (cfg, st) = data[2..].split_at(n);
        let e = crate::gpt2::load_peft_adapter_bytes(
            model.clone(),
            (cfg, Path::new("adapter_config.json")),
            (st, Path::new("adapter_model.safetensors")),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains(want),
            "{file}: {e}"
        );
    }
}
