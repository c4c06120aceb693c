//! Load a PyTorch minGPT / `GPT_LoRA` state dict (safetensors) into [`Gpt`].
//!
//! PyTorch `nn.Linear` stores `[out, in]`; Burn's Linear `[in, out]`, so Linear weights are
//! transposed. LoRA `A [r, in]` and `B [out, r]` are taken as stored.

use crate::mingpt::{Block, Gpt};
use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use lora_core::{LoraEmbedding, LoraLinear};
use safetensors::SafeTensors;

/// What went wrong reading a state dict.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not valid safetensors.
    #[error("{path}: not a valid safetensors file: {source}")]
    Format {
        path: String,
        source: safetensors::SafeTensorError,
    },
    /// Tensors missing or of the wrong shape / dtype, one line each.
    #[error("{path}: {}", .problems.join("; "))]
    Tensors { path: String, problems: Vec<String> },
    /// I/O.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Reads named f32 tensors, collecting every problem before failing.
pub struct TensorReader<'a> {
    st: SafeTensors<'a>,
    prefix: String,
    device: Device,
    problems: Vec<String>,
}

impl<'a> TensorReader<'a> {
    /// Reader over `bytes` (a safetensors file), keys prefixed by `prefix`.
    pub fn new(
        bytes: &'a [u8],
        path: &str,
        prefix: &str,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let st = SafeTensors::deserialize(bytes).map_err(|source| LoadError::Format {
            path: path.into(),
            source,
        })?;
        Ok(Self {
            st,
            prefix: prefix.into(),
            device: device.clone(),
            problems: vec![],
        })
    }

    /// Values (as f32; f16 / bf16 are converted) and shape of `key` (prefix added), or record
    /// the problem.
    pub fn raw(&mut self, key: &str) -> Option<(Vec<f32>, Vec<usize>)> {
        let full = format!("{}{key}", self.prefix);
        let view = match self.st.tensor(&full) {
            Ok(v) => v,
            Err(_) => {
                self.problems.push(format!("missing tensor '{full}'"));
                return None;
            }
        };
        let values = match lora_core::utils::tensor_f32(&view) {
            Ok(v) => v,
            Err(e) => {
                self.problems.push(format!("tensor '{full}' has {e}"));
                return None;
            }
        };
        Some((values, view.shape().to_vec()))
    }

    /// Tensor `key` with `expected` shape (as stored), transposed if `transpose`.
    pub fn tensor<const D: usize>(
        &mut self,
        key: &str,
        expected: [usize; D],
        transpose: bool,
    ) -> Option<Tensor<D>> {
        let (values, shape) = self.raw(key)?;
        if shape != expected {
            self.problems.push(format!(
                "tensor '{}{key}' has shape {shape:?}, expected {expected:?}",
                self.prefix
            ));
            return None;
        }
        let t = Tensor::<D>::from_data(TensorData::new(values, expected), &self.device);
        Some(if transpose { t.transpose() } else { t })
    }

    /// Replace `param`'s value by `key` (keeping its id and gradient setting), checking the shape.
    pub fn load<const D: usize>(
        &mut self,
        param: Param<Tensor<D>>,
        key: &str,
        transpose: bool,
    ) -> Param<Tensor<D>> {
        let mut expected: [usize; D] = param.lazy_shape().dims();
        if transpose {
            expected.reverse();
        }
        match self.tensor(key, expected, transpose) {
            Some(t) => param.map(|old| t.set_require_grad(old.is_require_grad())),
            None => param,
        }
    }

    /// Whether `key` (prefix added) is in the file.
    pub fn has(&self, key: &str) -> bool {
        self.st.tensor(&format!("{}{key}", self.prefix)).is_ok()
    }

    /// Record a problem of the caller's.
    pub fn problem(&mut self, message: String) {
        self.problems.push(message);
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every key in the file.
    pub fn keys(&self) -> Vec<String> {
        self.st.names().into_iter().map(String::from).collect()
    }

    /// Every recorded problem, `; `-joined, if any.
    /// The first five, then how many more (one readable line).
    pub fn problems(self) -> Result<(), String> {
        if self.problems.is_empty() {
            return Ok(());
        }
        let n = self.problems.len();
        let mut msg = self.problems[..n.min(5)].join("; ");
        if n > 5 {
            msg.push_str(&format!("; and {} more", n - 5));
        }
        Err(msg)
    }

    /// The message of a [`LoadError`] from [`TensorReader::new`] without its path (for callers
    /// that name the file themselves).
    pub fn reason(e: LoadError) -> String {
        match e {
            LoadError::Format { source, .. } => format!("not a valid safetensors file: {source}"),
            LoadError::Tensors { problems, .. } => problems.join("; "),
            LoadError::Io { source, .. } => source.to_string(),
        }
    }

    /// Fail with every recorded problem, if any.
    pub fn finish(self, path: &str) -> Result<(), LoadError> {
        let path = path.to_string();
        self.problems().map_err(|m| LoadError::Tensors {
            path,
            problems: vec![m],
        })
    }
}

/// Key names of one layer's tensors in a state dict.
pub struct LayerKeys<'a> {
    /// Base weight stored `[out, in]` (PyTorch Linear: transpose) or `[in, out]` (GPT-2 Conv1D).
    pub transpose: bool,
    /// Suffix of LoRA A (`lora_A`, or `lora_A.weight` in PEFT files).
    pub lora_a: &'a str,
    /// Suffix of LoRA B.
    pub lora_b: &'a str,
    /// Load the base weights.
    pub base: bool,
    /// Load the LoRA factors.
    pub lora: bool,
}

/// The exercise's state dicts: PyTorch Linear layout, LoRA factors named `lora_A` / `lora_B`.
pub const MINGPT_KEYS: LayerKeys = LayerKeys {
    transpose: true,
    lora_a: "lora_A",
    lora_b: "lora_B",
    base: true,
    lora: true,
};

/// Load one [`LoraLinear`] from `{key}.weight`, `{key}.bias`, `{key}.{lora_a}`, `{key}.{lora_b}`.
pub fn load_linear(
    r: &mut TensorReader,
    mut l: LoraLinear,
    key: &str,
    k: &LayerKeys,
) -> LoraLinear {
    if k.base {
        l.weight = r.load(l.weight, &format!("{key}.weight"), k.transpose);
        l.bias = l.bias.map(|b| r.load(b, &format!("{key}.bias"), false));
    }
    if k.lora {
        l.lora_a = l
            .lora_a
            .map(|a| r.load(a, &format!("{key}.{}", k.lora_a), false));
        l.lora_b = l
            .lora_b
            .map(|b| r.load(b, &format!("{key}.{}", k.lora_b), false));
    }
    l
}

/// Load one [`LoraEmbedding`] from `{key}.weight` and `{key}.lora_embedding_A` / `_B`.
pub fn load_embedding(
    r: &mut TensorReader,
    mut e: LoraEmbedding,
    key: &str,
    base: bool,
    lora: bool,
) -> LoraEmbedding {
    if base {
        e.weight = r.load(e.weight, &format!("{key}.weight"), false);
    }
    if lora {
        e.lora_a = e
            .lora_a
            .map(|a| r.load(a, &format!("{key}.lora_embedding_A"), false));
        e.lora_b = e
            .lora_b
            .map(|b| r.load(b, &format!("{key}.lora_embedding_B"), false));
    }
    e
}

/// Load a LayerNorm from `{key}.weight` (gamma) and `{key}.bias` (beta).
pub fn load_ln(
    r: &mut TensorReader,
    mut ln: burn::nn::LayerNorm,
    key: &str,
) -> burn::nn::LayerNorm {
    ln.gamma = r.load(ln.gamma, &format!("{key}.weight"), false);
    ln.beta = ln.beta.map(|b| r.load(b, &format!("{key}.bias"), false));
    ln
}

/// Load every block's LayerNorms (when `keys.base`) and Linear layers from `{prefix}h.{i}.…`.
pub fn load_blocks(
    r: &mut TensorReader,
    blocks: Vec<Block>,
    prefix: &str,
    keys: &LayerKeys,
) -> Vec<Block> {
    blocks
        .into_iter()
        .enumerate()
        .map(|(i, mut b)| {
            let k = format!("{prefix}h.{i}");
            if keys.base {
                b.ln_1 = load_ln(r, b.ln_1, &format!("{k}.ln_1"));
                b.ln_2 = load_ln(r, b.ln_2, &format!("{k}.ln_2"));
            }
            b.attn.c_attn = load_linear(r, b.attn.c_attn, &format!("{k}.attn.c_attn"), keys);
            b.attn.c_proj = load_linear(r, b.attn.c_proj, &format!("{k}.attn.c_proj"), keys);
            b.mlp.c_fc = load_linear(r, b.mlp.c_fc, &format!("{k}.mlp.c_fc"), keys);
            b.mlp.c_proj = load_linear(r, b.mlp.c_proj, &format!("{k}.mlp.c_proj"), keys);
            b
        })
        .collect()
}

/// Load minGPT state-dict keys (`{prefix}transformer.h.0.attn.c_attn.weight`, …) into `model`,
/// whose config (sizes, LoRA targets, rank) must match the file. Nothing is half-loaded: on any
/// problem the error lists every missing or mis-shaped tensor.
pub fn load_mingpt(model: Gpt, bytes: &[u8], path: &str, prefix: &str) -> Result<Gpt, LoadError> {
    let device = model.ln_f.gamma.lazy_device();
    let mut r = TensorReader::new(bytes, path, prefix, &device)?;
    let mut m = model;
    m.wte = load_embedding(&mut r, m.wte, "transformer.wte", true, true);
    m.wpe = load_embedding(&mut r, m.wpe, "transformer.wpe", true, true);
    m.h = load_blocks(&mut r, m.h, "transformer.", &MINGPT_KEYS);
    m.ln_f = load_ln(&mut r, m.ln_f, "transformer.ln_f");
    m.lm_head = m.lm_head.map(|mut head| {
        head.weight = r.load(head.weight, "lm_head.weight", true);
        head
    });
    r.finish(path)?;
    Ok(m)
}

/// [`load_mingpt`] from a file path.
pub fn load_mingpt_file(
    model: Gpt,
    path: &std::path::Path,
    prefix: &str,
) -> Result<Gpt, LoadError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: p.clone(),
        source,
    })?;
    load_mingpt(model, &bytes, &p, prefix)
}
