//! `config.json` parsing and checks, and GPT-2 safetensors loading into a small model
//! (gpt2-micro's shapes: 2 layers, 32 wide, vocab 512, 64 positions).
#![no_main]
use burn::tensor::Device;
use libfuzzer_sys::fuzz_target;
use lora_gpt::gpt2::{Gpt2HfConfig, load_gpt2_weights};
use std::path::Path;

mod micro;
use micro::micro;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Gpt2HfConfig::from_bytes(data, Path::new("config.json")) {
        let _ = c.gpt_config();
    }
    let model = micro().init(&Device::flex());
    let _ = load_gpt2_weights(model, data, Path::new("model.safetensors"));
});
