use crate::lm::{self, Sampling};
use crate::sort_demo::{SortDemoConfig, run};
use burn::tensor::Device;
use lora_gpt::gpt2::Gpt2Folder;
use std::path::{Path, PathBuf};

fn micro() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lora-gpt/tests/fixtures/gpt2-micro")
}

/// The gpt2-micro fixture model, merged for inference.
fn micro_model(d: &Device) -> lora_gpt::Gpt {
    Gpt2Folder::open(&micro().join("model"))
        .unwrap()
        .load(|c| c, d)
        .unwrap()
        .eval()
}

#[test]
fn eval_windows_and_loss_match_transformers() {
    // tools/make_eval_fixture.py crates/lora-gpt/tests/fixtures/gpt2-micro/model 64 --ids 150
    // -> {"tokens": 150, "windows": 3, "loss": 6.7821467421688535}
    let d = Device::flex();
    let model = micro_model(&d);
    let ids: Vec<u32> = (0..150u32).map(|i| (i * 37 + 11) % 512).collect();
    let r = lm::eval_ids(&model, &ids, 64, &d).unwrap();
    assert_eq!((r.tokens, r.windows), (150, 3));
    assert!(
        (r.loss - 6.7821467421688535).abs() < 1e-5,
        "loss {}",
        r.loss
    );
    assert!((r.perplexity - r.loss.exp()).abs() < 1e-9);
    // A last window of one token is dropped: 129 tokens = 64 + 64 + 1.
    assert_eq!(
        lm::eval_ids(&model, &ids[..129], 64, &d).unwrap().windows,
        2
    );
    let err = lm::eval_ids(&model, &ids, 65, &d).unwrap_err().to_string();
    assert!(
        err.contains("larger than the model's n_positions 64"),
        "{err}"
    );
}

#[test]
fn generate_checks_its_flags() {
    let d = Device::flex();
    let model = micro_model(&d);
    let greedy = Sampling {
        greedy: true,
        temperature: 1.0,
        top_k: None,
    };
    let out = lm::generate(&model, &[1, 2, 3], 4, greedy, &d).unwrap();
    assert_eq!(out.len(), 7);
    assert!(lm::generate(&model, &[], 4, greedy, &d).is_err());
    let bad_k = Sampling {
        greedy: false,
        temperature: 1.0,
        top_k: Some(0),
    };
    assert!(lm::generate(&model, &[1], 4, bad_k, &d).is_err());
    let bad_t = Sampling {
        greedy: false,
        temperature: 0.0,
        top_k: None,
    };
    assert!(lm::generate(&model, &[1], 4, bad_t, &d).is_err());
}

#[test]
fn sort_demo_smoke() {
    // A few iterations only: the full run is `cargo xtask sort-demo`.
    let cfg = SortDemoConfig {
        pretrain_iters: 3,
        finetune_iters: 3,
        eval_samples: 20,
        log_every: 0,
        ..Default::default()
    };
    let r = run(&cfg).unwrap();
    assert_eq!(
        (
            r.params.total,
            r.params.trainable_pretrain,
            r.params.trainable_lora
        ),
        (93_264, 86_352, 6_912)
    );
    for a in [
        r.accuracy.pretrain_len6,
        r.accuracy.before_lora_len10,
        r.accuracy.after_lora_len10,
    ] {
        assert!((0.0..=1.0).contains(&a.train) && (0.0..=1.0).contains(&a.test));
    }
    assert!(r.loss.pretrain[0].is_finite() && r.loss.finetune[1].is_finite());
    let json = serde_json::to_value(&r).unwrap();
    for key in ["seed", "backend", "params", "accuracy", "timing"] {
        assert!(json.get(key).is_some(), "report lacks {key}");
    }
}

#[test]
fn atomic_write_leaves_no_partial_file() {
    let dir = std::env::temp_dir().join(format!("lora-train-test-{}", std::process::id()));
    let path = dir.join("r.json");
    crate::fsutil::write_json_atomic(&path, &serde_json::json!({"a": 1})).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\n  \"a\": 1\n}\n"
    );
    // A folder in the way: an error naming the path, nothing left behind.
    let blocked = dir.join("sub");
    std::fs::create_dir_all(blocked.join("x.json")).unwrap();
    let err = crate::fsutil::write_atomic(&blocked.join("x.json"), b"{}")
        .unwrap_err()
        .to_string();
    assert!(err.contains("x.json"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(&blocked)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_validation_split() {
    use crate::data::{Dataset, split};
    // Text and news: by position, validation at the end.
    let (t, v) = split(Dataset::Text, 10, 0, 0.2);
    assert_eq!((t, v), ((0..8).collect(), vec![8, 9]));
    // Alpaca: shuffled with the seed, deterministic, a partition.
    let (t1, v1) = split(Dataset::Alpaca, 100, 3, 0.1);
    assert_eq!(
        (t1.clone(), v1.clone()),
        split(Dataset::Alpaca, 100, 3, 0.1)
    );
    assert_ne!(v1, split(Dataset::Alpaca, 100, 4, 0.1).1);
    let mut all = [t1, v1.clone()].concat();
    all.sort_unstable();
    assert_eq!((all, v1.len()), ((0..100).collect(), 10));
}

/// `--precision f16` on a device without f16 (the CI's llvmpipe) is a one-line error before any
/// work, not a shader that fails to compile mid-step; where the device has f16 (a GPU), it runs.
#[test]
fn f16_needs_a_device_with_f16() {
    use crate::finetune::{Compute, Precision};
    let f16 = Compute {
        precision: Precision::F16,
        ..Compute::default()
    };
    let has_f16 = crate::Backend::Wgpu
        .device()
        .expect("wgpu device")
        .supports_dtype(burn::tensor::DType::F16);
    match (f16.device(crate::Backend::Wgpu), has_f16) {
        (Err(e), false) => assert_eq!(
            e.to_string(),
            "--precision f16: this machine's --backend wgpu device has no f16 (Mesa's llvmpipe has none); use --precision f32"
        ),
        (Ok(_), true) => {}
        (got, _) => panic!(
            "f16 support {has_f16}, but device() gave {:?}",
            got.map(|_| ())
        ),
    }
    // The CPU backends compute in f16.
    assert!(f16.device(crate::Backend::Flex).is_ok());
}
