//! Short runnable programs (`cargo run --release --example NAME` from the workspace root):
//!
//! - `any_model`: LoRA on a model written only with `burn::nn`, through both of lora-core's routes
//!   (drop-in `LoraLinear` fields, and `inject` with no code change), recipe D.
