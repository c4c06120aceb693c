//! LoRA building blocks for any Burn model (after microsoft/loralib).
//!
//! - [`layers`]: [`LoraLinear`] and [`LoraEmbedding`], drop-in for `burn::nn::Linear` / `Embedding`,
//!   with factored forward, dropout and merge / un-merge.
//! - [`inject`]: the no-code route: LoRA on the 2-D weights of any model, by module-path targets,
//!   through Burn's parameter reparameterization.
//! - [`utils`]: model-wide helpers: freeze all but LoRA (`mark_only_lora_as_trainable`),
//!   the trainable-parameter report, global gradient-norm clipping.

pub mod adamw;
pub mod coopmat;
pub mod dropout;
pub mod fused;
pub mod gemm;
pub mod inject;
pub mod kernels;
pub mod layers;
pub mod matmul;
pub mod utils;

pub use adamw::FusedAdamW;
pub use dropout::{dropout, dropout_folded, dropout_mask};
pub use inject::{InjectConfig, InjectError, Target, inject};
pub use layers::{
    LoraEmbedding, LoraEmbeddingConfig, LoraLinear, LoraLinearConfig, LoraMerge, Scaling,
};
pub use utils::{
    LossScaler, ParamReport, SettleRead, StartedRead, TooLargeForDevice, Unscaled, cast_to,
    check_buffers, clip_grad_norm, load_params_by_path, mark_only_lora_as_trainable,
    max_binding_bytes, param_report, params_by_path, path_param_ids,
};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_inject;
