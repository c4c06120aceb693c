//! Load a PyTorch minGPT / `GPT_LoRA` state dict (safetensors) into [`Gpt`].
//!
//! PyTorch `nn.Linear` stores `[out, in]`; Burn's Linear `[in, out]`, so Linear weights are
//! transposed. LoRA `A [r, in]` and `B [out, r]` are taken as stored.

use crate::mingpt::Gpt;
use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use lora_core::{LoraEmbedding, LoraLinear};
use safetensors::{Dtype, SafeTensors};

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

    /// Raw f32 values and shape of `key` (prefix added), or record the problem.
    pub fn raw(&mut self, key: &str) -> Option<(Vec<f32>, Vec<usize>)> {
        let full = format!("{}{key}", self.prefix);
        let view = match self.st.tensor(&full) {
            Ok(v) => v,
            Err(_) => {
                self.problems.push(format!("missing tensor '{full}'"));
                return None;
            }
        };
        if view.dtype() != Dtype::F32 {
            self.problems.push(format!(
                "tensor '{full}' has dtype {:?}, expected F32",
                view.dtype()
            ));
            return None;
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
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

    /// Fail with every recorded problem, if any.
    pub fn finish(self, path: &str) -> Result<(), LoadError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(LoadError::Tensors {
                path: path.into(),
                problems: self.problems,
            })
        }
    }
}

fn load_linear(r: &mut TensorReader, mut l: LoraLinear, key: &str) -> LoraLinear {
    l.weight = r.load(l.weight, &format!("{key}.weight"), true);
    l.bias = l.bias.map(|b| r.load(b, &format!("{key}.bias"), false));
    l.lora_a = l.lora_a.map(|a| r.load(a, &format!("{key}.lora_A"), false));
    l.lora_b = l.lora_b.map(|b| r.load(b, &format!("{key}.lora_B"), false));
    l
}

fn load_embedding(r: &mut TensorReader, mut e: LoraEmbedding, key: &str) -> LoraEmbedding {
    e.weight = r.load(e.weight, &format!("{key}.weight"), false);
    e.lora_a = e
        .lora_a
        .map(|a| r.load(a, &format!("{key}.lora_embedding_A"), false));
    e.lora_b = e
        .lora_b
        .map(|b| r.load(b, &format!("{key}.lora_embedding_B"), false));
    e
}

fn load_ln(r: &mut TensorReader, mut ln: burn::nn::LayerNorm, key: &str) -> burn::nn::LayerNorm {
    ln.gamma = r.load(ln.gamma, &format!("{key}.weight"), false);
    ln.beta = ln.beta.map(|b| r.load(b, &format!("{key}.bias"), false));
    ln
}

/// Load minGPT state-dict keys (`{prefix}transformer.h.0.attn.c_attn.weight`, …) into `model`,
/// whose config (sizes, LoRA targets, rank) must match the file. Nothing is half-loaded: on any
/// problem the error lists every missing or mis-shaped tensor.
pub fn load_mingpt(model: Gpt, bytes: &[u8], path: &str, prefix: &str) -> Result<Gpt, LoadError> {
    let device = model.lm_head.weight.lazy_device();
    let mut r = TensorReader::new(bytes, path, prefix, &device)?;
    let mut m = model;
    m.wte = load_embedding(&mut r, m.wte, "transformer.wte");
    m.wpe = load_embedding(&mut r, m.wpe, "transformer.wpe");
    m.h =
        m.h.into_iter()
            .enumerate()
            .map(|(i, mut b)| {
                let k = format!("transformer.h.{i}");
                b.ln_1 = load_ln(&mut r, b.ln_1, &format!("{k}.ln_1"));
                b.ln_2 = load_ln(&mut r, b.ln_2, &format!("{k}.ln_2"));
                b.attn.c_attn = load_linear(&mut r, b.attn.c_attn, &format!("{k}.attn.c_attn"));
                b.attn.c_proj = load_linear(&mut r, b.attn.c_proj, &format!("{k}.attn.c_proj"));
                b.mlp.c_fc = load_linear(&mut r, b.mlp.c_fc, &format!("{k}.mlp.c_fc"));
                b.mlp.c_proj = load_linear(&mut r, b.mlp.c_proj, &format!("{k}.mlp.c_proj"));
                b
            })
            .collect();
    m.ln_f = load_ln(&mut r, m.ln_f, "transformer.ln_f");
    m.lm_head.weight = r.load(m.lm_head.weight, "lm_head.weight", true);
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
