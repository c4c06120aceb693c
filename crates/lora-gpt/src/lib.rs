//! GPT models with LoRA: minGPT (karpathy/minGPT, the LoRA exercise's `GPT_LoRA`).

pub mod export;
pub mod fused;
pub mod gpt2;
mod host;
pub mod mingpt;
pub mod optim;
pub mod pytorch;

pub use mingpt::{Gpt, GptConfig, LoraTargets};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod tests_gpt2;

#[cfg(test)]
mod tests_fused;
