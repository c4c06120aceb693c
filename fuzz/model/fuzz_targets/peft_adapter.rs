//! The PEFT adapter loader: `adapter_config.json` and `adapter_model.safetensors` into a small
//! GPT-2 (gpt2-micro's shapes). Input: a little-endian u16 length, that many bytes of config,
//! then the safetensors bytes.
#![no_main]
use burn::tensor::Device;
use libfuzzer_sys::fuzz_target;
use lora_gpt::gpt2::load_peft_adapter_bytes;
use std::path::Path;

mod micro;
use micro::micro;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (cfg, st) = data[2..].split_at(n);
    let model = micro().init(&Device::flex());
    let _ = load_peft_adapter_bytes(
        model,
        (cfg, Path::new("adapter_config.json")),
        (st, Path::new("adapter_model.safetensors")),
    );
});
