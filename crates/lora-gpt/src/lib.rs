//! GPT models with LoRA: minGPT (karpathy/minGPT, the LoRA exercise's `GPT_LoRA`).

pub mod export;
mod flash;
pub mod flash_cm;
pub mod fused;
pub mod gpt2;
mod host;
mod kernels;
pub mod mingpt;
pub mod norm_lora;
pub mod optim;
pub mod pytorch;

pub use mingpt::{Gpt, GptConfig, LoraTargets};

#[cfg(test)]
mod tests;

/// One wgpu test at a time: run concurrently from several test threads on the one device, the
/// head + loss op gave a wrong (and repeatable) loss in one case that passes alone; training
/// drives a device from one thread.
#[cfg(test)]
static WGPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests_gpt2;

#[cfg(test)]
mod tests_fused;
