//! The exercise's optimizer setup (minGPT `configure_optimizers` + `GPT_LoRA`'s override).

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::Tensor;

/// minGPT's trainer settings that reach the optimizer.
#[derive(Debug, Clone, Copy)]
pub struct OptimConfig {
    /// AdamW betas.
    pub betas: (f32, f32),
    /// AdamW epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

impl Default for OptimConfig {
    /// minGPT's `Trainer.get_default_config()`: betas (0.9, 0.95), weight decay 0.1; PyTorch's eps.
    fn default() -> Self {
        Self {
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

impl OptimConfig {
    fn adamw(&self, weight_decay: f32) -> AdamWConfig {
        AdamWConfig::new()
            .with_beta_1(self.betas.0)
            .with_beta_2(self.betas.1)
            .with_epsilon(self.eps)
            .with_weight_decay(weight_decay)
    }
}

/// Parameters by module path (`h.0.attn.c_attn.weight`).
pub type NamedParams = Vec<(String, ParamId)>;

/// minGPT's no-decay set: every bias, LayerNorm weight (`gamma`, `beta`) and Embedding table.
/// Returns `(decay, no_decay)` parameter paths, every float parameter in exactly one.
pub fn decay_groups<M: Module>(model: &M) -> (NamedParams, NamedParams) {
    struct Groups {
        path: Vec<String>,
        decay: NamedParams,
        no_decay: NamedParams,
    }
    impl ModuleVisitor for Groups {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let name = self.path.join(".");
            let leaf = self.path.last().map(String::as_str).unwrap_or("");
            let parent = self
                .path
                .iter()
                .rev()
                .nth(1)
                .map(String::as_str)
                .unwrap_or("");
            let no_decay = leaf == "bias"
                || leaf == "gamma"
                || leaf == "beta"
                || (leaf == "weight" && (parent == "wte" || parent == "wpe"));
            let entry = (name, param.id);
            if no_decay {
                self.no_decay.push(entry)
            } else {
                self.decay.push(entry)
            }
        }
    }
    let mut g = Groups {
        path: vec![],
        decay: vec![],
        no_decay: vec![],
    };
    model.visit(&mut g);
    (g.decay, g.no_decay)
}

/// The exercise's optimizer: with LoRA (`lora_rank > 0`) plain AdamW with decay on every trained
/// tensor; without, minGPT's decay / no-decay grouping. Frozen parameters get no gradient and so
/// no update.
pub fn configure_optimizer<M: Module>(
    model: &M,
    lora_rank: usize,
    cfg: OptimConfig,
) -> ModuleOptimizer {
    let base = cfg.adamw(cfg.weight_decay).init();
    if lora_rank > 0 {
        return base;
    }
    let (_, no_decay) = decay_groups(model);
    let ids = no_decay.into_iter().map(|(_, id)| id).collect();
    base.with_group(
        burn::module::ParamGroup::from_ids(ids),
        cfg.adamw(0.0).build(),
        None,
    )
}
