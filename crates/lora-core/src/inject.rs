//! LoRA on a model you did not write, with no code change: every 2-D weight whose module path
//! matches a target gets a LoRA adapter through Burn's own parameter reparameterization
//! (`W_eff = W + s · A B`, `A [d_in, rank]`, `B [rank, d_out]`), PEFT's `inject_adapter_in_model`.
//!
//! Costs against the drop-in [`LoraLinear`](crate::LoraLinear) (measured by
//! `cargo xtask bench lora-layer`): every forward rebuilds the dense `[d_in, d_out]` weight (an
//! `d_in·rank·d_out` matmul plus a weight-sized add, and backward a weight-sized gradient), and
//! the adapter cannot have input dropout (it never sees `x`). Un-merge is not offered: [`merge`]
//! folds and removes the adapters (keep a clone to go on training).
//!
//! ```ignore
//! let cfg = InjectConfig::new(8, 16.0).with_targets(&["all-linear"])?;
//! let model = inject(model, &cfg)?;            // bases frozen, only A / B train
//! println!("{}", param_report(&model));        // trainable params: … || all params: …
//! save_adapter(&model, &cfg, "adapter.safetensors".as_ref())?;  // only A / B, by module path
//! let merged = merge(model);                   // W ← W + s·A B; plain weights again
//! ```

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr;

use burn::module::{
    LoraAdapter, Module, ModuleVisitor, Param, Reparameterization, Reparameterizer,
};
use burn::tensor::{Distribution, FloatDType, Tensor};

use crate::Scaling;
use crate::utils::{
    NamedValues, PathStack, ValuesByPath, load_params_by_path, params_by_path, safetensors_bytes,
    tensor_f32, write_atomic,
};

/// Which 2-D weights get an adapter. Matched against the module path: the parameter path without
/// a trailing `.weight` (`encoder.layers.0.fc1` for `encoder.layers.0.fc1.weight`).
#[derive(Debug, Clone)]
pub enum Target {
    /// Every `burn::nn::Linear` weight (PEFT's `"all-linear"`, output layer included).
    AllLinear,
    /// A module name or path suffix, as PEFT's `target_modules=["fc1"]`: `fc1` matches
    /// `fc1`, `mlp.fc1`, `layers.3.fc1`, but not `fc10`.
    Name(String),
    /// A glob over the whole path: `*` any run within one segment, `**` anything, `?` one character.
    Glob { pattern: String, re: regex::Regex },
    /// A regex matching the whole path (PEFT's string `target_modules`).
    Regex(regex::Regex),
}

impl FromStr for Target {
    type Err = InjectError;

    /// `all-linear`, `re:REGEX`, a glob (has `*` or `?`), or a name.
    fn from_str(s: &str) -> Result<Self, InjectError> {
        let bad = |reason: String| InjectError::BadTarget {
            target: s.into(),
            reason,
        };
        let s = s.trim();
        if s.is_empty() {
            return Err(bad("empty".into()));
        }
        if s == "all-linear" || s == "all_linear" {
            return Ok(Target::AllLinear);
        }
        if let Some(re) = s.strip_prefix("re:") {
            return regex::Regex::new(&format!("^(?:{re})$"))
                .map(Target::Regex)
                .map_err(|e| bad(e.to_string()));
        }
        if s.contains(['*', '?']) {
            let mut re = String::from("^");
            let mut chars = s.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '*' if chars.peek() == Some(&'*') => {
                        chars.next();
                        re.push_str(".*");
                    }
                    '*' => re.push_str("[^.]*"),
                    '?' => re.push_str("[^.]"),
                    c => re.push_str(&regex::escape(&c.to_string())),
                }
            }
            re.push('$');
            let re = regex::Regex::new(&re).map_err(|e| bad(e.to_string()))?;
            return Ok(Target::Glob {
                pattern: s.into(),
                re,
            });
        }
        Ok(Target::Name(s.into()))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::AllLinear => write!(f, "all-linear"),
            Target::Name(n) => write!(f, "{n}"),
            Target::Glob { pattern, .. } => write!(f, "{pattern}"),
            Target::Regex(re) => {
                let s = re.as_str();
                write!(f, "re:{}", &s[4..s.len() - 2])
            }
        }
    }
}

impl Target {
    fn matches(&self, w: &Weight) -> bool {
        match self {
            Target::AllLinear => {
                w.container == "Struct:Linear" && w.path.rsplit('.').next() == Some("weight")
            }
            Target::Name(n) => {
                w.module == *n
                    || w.module
                        .strip_suffix(n.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }
            Target::Glob { re, .. } | Target::Regex(re) => re.is_match(&w.module),
        }
    }
}

/// What [`inject`] adds: rank, alpha, scaling convention, targets.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// LoRA rank (≥ 1, ≤ min(d_in, d_out) of every target).
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// How `alpha` becomes the factor `s`.
    pub scaling: Scaling,
    /// Weights to adapt; each must match at least one.
    pub targets: Vec<Target>,
}

impl InjectConfig {
    /// Rank and alpha, `alpha / rank` scaling, no targets yet.
    pub fn new(rank: usize, alpha: f64) -> Self {
        Self {
            rank,
            alpha,
            scaling: Scaling::AlphaOverRank,
            targets: vec![],
        }
    }

    /// Targets parsed from strings (see [`Target::from_str`]).
    pub fn with_targets(mut self, targets: &[&str]) -> Result<Self, InjectError> {
        self.targets = targets
            .iter()
            .map(|t| t.parse())
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// The scaling convention.
    pub fn with_scaling(mut self, scaling: Scaling) -> Self {
        self.scaling = scaling;
        self
    }

    /// The factor `s` adapters are built with.
    pub fn scale(&self) -> f64 {
        self.scaling.factor(self.alpha, self.rank)
    }
}

/// What can go wrong injecting, saving or loading adapters.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A target string that cannot be parsed.
    #[error("bad LoRA target '{target}': {reason}")]
    BadTarget { target: String, reason: String },
    /// A target that names no 2-D weight; `weights` lists the model's.
    #[error(
        "LoRA target '{target}' matches no 2-D weight of the model (its 2-D weights: {weights})"
    )]
    NoMatch { target: String, weights: String },
    /// Rank 0, no targets, or a rank above a target's smaller side.
    #[error("{0}")]
    Config(String),
    /// The model already carries adapters (nested reparameterization is not supported).
    #[error("'{0}' already has a LoRA adapter; inject once")]
    AlreadyInjected(String),
    /// An adapter file that cannot be written or read, or does not fit the model.
    #[error("{file}: {reason}")]
    Adapter { file: String, reason: String },
}

/// A 2-D float parameter of the model.
struct Weight {
    /// Parameter path, `layers.0.fc1.weight`.
    path: String,
    /// The path without a trailing `.weight`.
    module: String,
    /// Type of the struct that owns it (`Struct:Linear`).
    container: String,
    dims: Vec<usize>,
}

#[derive(Default)]
struct Weights {
    path: PathStack,
    containers: Vec<String>,
    out: Vec<Weight>,
    /// Factors already attached: path (`fc1.weight.lora.a`) and shape.
    adapters: Vec<(String, Vec<usize>)>,
}

impl ModuleVisitor for Weights {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name);
        self.containers.push(container.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
        self.containers.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.0.join(".");
        if is_adapter_path(&self.path.0) {
            self.adapters
                .push((path, param.lazy_shape().dims::<D>().to_vec()));
            return;
        }
        if D == 2 {
            let module = path.strip_suffix(".weight").unwrap_or(&path).to_string();
            self.out.push(Weight {
                module,
                path,
                container: self.containers.last().cloned().unwrap_or_default(),
                dims: param.lazy_shape().dims::<D>().to_vec(),
            });
        }
    }
}

/// `["fc1", "weight", "lora", "a"]`: a factor Burn's reparameterization holds.
pub(crate) fn is_adapter_path(path: &[String]) -> bool {
    matches!(path, [.., lora, ab] if lora == <LoraAdapter as Reparameterization>::NAME && (ab == "a" || ab == "b"))
}

/// Builds the adapters: `A` uniform ±1/√d_in (PEFT's Kaiming-uniform, a = √5), `B` zeros, bases
/// and every other parameter frozen.
struct Injector {
    chosen: BTreeSet<String>,
    rank: usize,
    scale: f64,
}

impl Reparameterizer for Injector {
    type Reparam = LoraAdapter;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraAdapter>) {
        let base = param.set_require_grad(false);
        if D != 2 || !self.chosen.contains(path) {
            return (base, None);
        }
        let w = base.val();
        let (device, dtype) = (w.device(), w.dtype());
        let [d_in, d_out] = [w.dims()[0], w.dims()[1]];
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::<2>::random(
            [d_in, self.rank],
            Distribution::Uniform(-bound, bound),
            &device,
        );
        let b = Tensor::<2>::zeros([self.rank, d_out], &device);
        let (a, b) = if dtype.is_float() && dtype != a.dtype() {
            let f = FloatDType::from(dtype);
            (a.cast(f), b.cast(f))
        } else {
            (a, b)
        };
        let adapter = LoraAdapter {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            scale: self.scale,
        };
        (base, Some(adapter))
    }
}

/// Add a LoRA adapter to every 2-D weight a target of `cfg` matches; freeze everything else.
///
/// Errors: rank 0, no targets, a target matching nothing (the message lists the model's 2-D
/// weights), rank above a matched weight's smaller side, adapters already present.
pub fn inject<M: Module>(model: M, cfg: &InjectConfig) -> Result<M, InjectError> {
    if cfg.rank == 0 {
        return Err(InjectError::Config("LoRA rank must be at least 1".into()));
    }
    if cfg.targets.is_empty() {
        return Err(InjectError::Config("no LoRA targets given".into()));
    }
    let mut seen = Weights::default();
    model.visit(&mut seen);
    if let Some((path, _)) = seen.adapters.into_iter().next() {
        return Err(InjectError::AlreadyInjected(path));
    }
    let mut chosen = BTreeSet::new();
    for target in &cfg.targets {
        let hits: Vec<&Weight> = seen.out.iter().filter(|w| target.matches(w)).collect();
        if hits.is_empty() {
            let mut names: Vec<&str> = seen.out.iter().map(|w| w.module.as_str()).collect();
            let more = names.len().saturating_sub(12);
            names.truncate(12);
            let mut weights = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            };
            if more > 0 {
                weights.push_str(&format!(" and {more} more"));
            }
            return Err(InjectError::NoMatch {
                target: target.to_string(),
                weights,
            });
        }
        for w in hits {
            let side = w.dims.iter().copied().min().unwrap_or(0);
            if cfg.rank > side {
                return Err(InjectError::Config(format!(
                    "LoRA rank {} is larger than min(d_in, d_out) = {side} of '{}' {:?}",
                    cfg.rank, w.path, w.dims
                )));
            }
            chosen.insert(w.path.clone());
        }
    }
    Ok(model.apply_reparameterization(Injector {
        chosen,
        rank: cfg.rank,
        scale: cfg.scale(),
    }))
}

/// Module paths that carry an adapter (`layers.0.fc1`), in model order.
pub fn adapted_modules<M: Module>(model: &M) -> Vec<String> {
    adapters(model)
        .into_iter()
        .filter_map(|(p, _)| {
            peft_key(&p)?
                .strip_suffix(".lora_A.weight")
                .map(str::to_string)
        })
        .collect()
}

/// The attached factors' paths and shapes (no values read).
fn adapters<M: Module>(model: &M) -> Vec<(String, Vec<usize>)> {
    let mut seen = Weights::default();
    model.visit(&mut seen);
    seen.adapters
}

/// Fold every adapter into its weight (`W ← W + s·A B`) and drop the adapters.
pub fn merge<M: Module>(model: M) -> M {
    model.materialize()
}

/// PEFT's key for a factor path: `fc1.weight.lora.a` → `fc1.lora_A.weight`.
fn peft_key(path: &str) -> Option<String> {
    let (param, ab) = path.rsplit_once(".lora.")?;
    let module = param.strip_suffix(".weight").unwrap_or(param);
    let side = if ab == "a" { "A" } else { "B" };
    Some(format!("{module}.lora_{side}.weight"))
}

/// `[rows, cols]` row-major values transposed.
fn transpose(shape: &[usize], v: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let (r, c) = (shape[0], shape[1]);
    let mut out = vec![0.0; v.len()];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = v[i * c + j];
        }
    }
    (vec![c, r], out)
}

/// The adapters only, in PEFT's layout and names: `{module}.lora_A.weight` `[rank, d_in]`,
/// `{module}.lora_B.weight` `[d_out, rank]`.
pub fn adapter_tensors<M: Module>(model: &M) -> Vec<NamedValues> {
    params_by_path(model, |p, _| peft_key(p).is_some())
        .into_iter()
        .filter_map(|(path, shape, v)| {
            let key = peft_key(&path)?;
            let (shape, v) = transpose(&shape, &v);
            Some((key, shape, v))
        })
        .collect()
}

/// Write the adapters ([`adapter_tensors`]) to a safetensors file, atomically, with the rank,
/// alpha, scaling and targets of `cfg` in its metadata.
pub fn save_adapter<M: Module>(
    model: &M,
    cfg: &InjectConfig,
    file: &Path,
) -> Result<(), InjectError> {
    let err = |reason: String| InjectError::Adapter {
        file: file.display().to_string(),
        reason,
    };
    let tensors = adapter_tensors(model);
    if tensors.is_empty() {
        return Err(err("the model has no adapters to save".into()));
    }
    let targets: Vec<String> = cfg.targets.iter().map(|t| t.to_string()).collect();
    let meta = [
        ("lora_rank", cfg.rank.to_string()),
        ("lora_alpha", cfg.alpha.to_string()),
        ("lora_scaling", format!("{:?}", cfg.scaling)),
        ("target_modules", targets.join(",")),
    ];
    let bytes = safetensors_bytes(&tensors, &meta).map_err(|e| err(e.to_string()))?;
    write_atomic(file, &bytes).map_err(|e| err(format!("cannot write: {e}")))
}

/// Load adapters saved by [`save_adapter`] into a model injected with the same `cfg`: every
/// adapter of the model must be in the file with its shape, and nothing else; rank, alpha and
/// scaling in the file's metadata must equal `cfg`'s.
pub fn load_adapter<M: Module>(
    model: M,
    cfg: &InjectConfig,
    file: &Path,
) -> Result<M, InjectError> {
    let err = |reason: String| InjectError::Adapter {
        file: file.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(file).map_err(|e| err(e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    for (key, want) in [
        ("lora_rank", cfg.rank.to_string()),
        ("lora_alpha", cfg.alpha.to_string()),
        ("lora_scaling", format!("{:?}", cfg.scaling)),
    ] {
        if let Some(got) = meta.get(key).filter(|got| **got != want) {
            return Err(err(format!(
                "{key} is {got} in the file but {want} in the config"
            )));
        }
    }
    let mut values = ValuesByPath::new();
    let mut problems = vec![];
    let mut wanted = BTreeSet::new();
    for (path, shape) in adapters(&model) {
        let key = peft_key(&path).expect("filtered");
        wanted.insert(key.clone());
        let view = match st.tensor(&key) {
            Ok(v) => v,
            Err(_) => {
                problems.push(format!("missing tensor '{key}'"));
                continue;
            }
        };
        let expected = vec![shape[1], shape[0]];
        if view.shape() != expected {
            problems.push(format!(
                "tensor '{key}' has shape {:?}, the model needs {expected:?}",
                view.shape()
            ));
            continue;
        }
        match tensor_f32(&view) {
            Ok(v) => {
                values.insert(path, transpose(&expected, &v));
            }
            Err(e) => problems.push(format!("tensor '{key}' has {e}")),
        }
    }
    if wanted.is_empty() {
        return Err(err("the model has no adapters; inject it first".into()));
    }
    let mut extra: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !wanted.contains(*n))
        .map(str::to_string)
        .collect();
    extra.sort();
    if !extra.is_empty() {
        problems.push(format!(
            "tensors the model has no adapter for: {}",
            extra.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(err(problems.join("; ")));
    }
    load_params_by_path(model, &values).map_err(err)
}
