//! gpt2-micro's configuration, shared by the model fuzz targets.

use lora_gpt::gpt2::Gpt2HfConfig;
use std::path::Path;

/// gpt2-micro's configuration (2 layers, 32 wide, vocab 512, 64 positions), as
/// `Gpt2Folder::load` builds it (no adapters yet).
pub fn micro() -> lora_gpt::GptConfig {
    let bytes =
        include_bytes!("../../../crates/lora-gpt/tests/fixtures/gpt2-micro/model/config.json");
    let mut cfg = Gpt2HfConfig::from_bytes(bytes, Path::new("config.json"))
        .unwrap()
        .gpt_config();
    cfg.lora_rank = 0;
    cfg
}
