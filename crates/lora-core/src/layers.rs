//! LoRA layers: `y = x W + b + s · (dropout(x) Aᵀ) Bᵀ`, with `A [rank, in]`, `B [out, rank]` as PEFT
//! and loralib store them, and `W [in, out]` as `burn::nn::Linear` stores it.

use crate::cast_to;
use crate::fused::LoraParts;
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Initializer};
use burn::tensor::module::embedding;
use burn::tensor::{DType, Device, Distribution, Int, Tensor};

/// How the adapter output is scaled.
#[derive(Config, Debug, Copy, PartialEq)]
pub enum Scaling {
    /// `alpha / rank` (loralib, PEFT default; recipes A and E).
    AlphaOverRank,
    /// `alpha` (recipes B and D write `alpha * x @ A @ B`).
    Alpha,
    /// `alpha / sqrt(rank)` (rsLoRA, PEFT's `use_rslora`).
    RsLora,
}

impl Scaling {
    /// The factor `s` for a rank and alpha (0 when `rank == 0`).
    pub fn factor(self, alpha: f64, rank: usize) -> f64 {
        if rank == 0 {
            return 0.0;
        }
        match self {
            Scaling::AlphaOverRank => alpha / rank as f64,
            Scaling::Alpha => alpha,
            Scaling::RsLora => alpha / (rank as f64).sqrt(),
        }
    }
}

/// Merge the low-rank update into the base weight and back (loralib's `merge_weights`).
///
/// Both are idempotent: a second `merge` (or `unmerge`) is a no-op.
pub trait LoraMerge: Sized {
    /// `W ← W + s·ΔW`; afterwards the forward pass uses only `W`.
    fn merge(self) -> Self;
    /// `W ← W − s·ΔW`; afterwards the forward pass is factored again.
    fn unmerge(self) -> Self;
}

impl<T: LoraMerge> LoraMerge for Vec<T> {
    fn merge(self) -> Self {
        self.into_iter().map(T::merge).collect()
    }
    fn unmerge(self) -> Self {
        self.into_iter().map(T::unmerge).collect()
    }
}

impl<T: LoraMerge> LoraMerge for Option<T> {
    fn merge(self) -> Self {
        self.map(T::merge)
    }
    fn unmerge(self) -> Self {
        self.map(T::unmerge)
    }
}

/// `s · (B A)ᵀ = s · Aᵀ Bᵀ`, detached; `None` without an adapter. Same formula for Linear
/// (`[d_input, d_output]`) and Embedding (`[n_embedding, d_model]`) layouts.
fn delta(
    a: &Option<Param<Tensor<2>>>,
    b: &Option<Param<Tensor<2>>>,
    scaling: f64,
) -> Option<Tensor<2>> {
    let (a, b) = (a.as_ref()?, b.as_ref()?);
    Some(
        a.val()
            .detach()
            .transpose()
            .matmul(b.val().detach().transpose())
            .mul_scalar(scaling),
    )
}

/// Fold the delta into (`merge`) or out of the weight, once: `merged` tracks which side it is on.
fn fold(
    weight: Param<Tensor<2>>,
    delta: Option<Tensor<2>>,
    merged: &mut bool,
    merge: bool,
) -> Param<Tensor<2>> {
    match delta {
        Some(delta) if *merged != merge => {
            *merged = merge;
            let sign = if merge { 1.0 } else { -1.0 };
            weight.map(|w| {
                let require_grad = w.is_require_grad();
                // A frozen base kept in half precision takes the delta rounded to it.
                let delta = cast_to(delta.mul_scalar(sign), w.dtype());
                (w.detach() + delta).set_require_grad(require_grad)
            })
        }
        _ => weight,
    }
}

/// [`LoraMerge`] for a layer with `weight`, `lora_a`, `lora_b`, `scaling`, `merged` fields.
macro_rules! impl_merge {
    ($layer:ty) => {
        impl $layer {
            /// `s · (B A)ᵀ` in the weight's layout, detached (None at rank 0).
            pub fn delta_weight(&self) -> Option<Tensor<2>> {
                delta(&self.lora_a, &self.lora_b, self.scaling)
            }
        }

        impl LoraMerge for $layer {
            fn merge(mut self) -> Self {
                let d = if self.merged {
                    None
                } else {
                    self.delta_weight()
                };
                self.weight = fold(self.weight, d, &mut self.merged, true);
                self
            }
            fn unmerge(mut self) -> Self {
                let d = if self.merged {
                    self.delta_weight()
                } else {
                    None
                };
                self.weight = fold(self.weight, d, &mut self.merged, false);
                self
            }
        }
    };
}

impl_merge!(LoraLinear);
impl_merge!(LoraEmbedding);

/// Configuration of a [`LoraLinear`]; the first fields are `burn::nn::LinearConfig`'s.
#[derive(Config, Debug)]
pub struct LoraLinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether the layer has a bias.
    #[config(default = true)]
    pub bias: bool,
    /// Base weight initializer (default: `burn::nn::Linear`'s, i.e. PyTorch's).
    #[config(default = "Initializer::KaimingUniform{gain:0.5773502691896258, fan_out_only:false}")]
    pub initializer: Initializer,
    /// LoRA rank; 0 gives exactly the plain linear layer (no A, no B).
    #[config(default = 0)]
    pub rank: usize,
    /// LoRA alpha.
    #[config(default = 1.0)]
    pub alpha: f64,
    /// Dropout on the adapter's input.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Scaling convention.
    #[config(default = "Scaling::AlphaOverRank")]
    pub scaling: Scaling,
}

/// Linear layer with a LoRA adapter.
///
/// Same record layout as `burn::nn::Linear` for `weight [d_input, d_output]` and `bias [d_output]`,
/// plus `lora_a [rank, d_input]` and `lora_b [d_output, rank]`.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// Base weight `[d_input, d_output]`.
    pub weight: Param<Tensor<2>>,
    /// Base bias `[d_output]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// `A [rank, d_input]`, Kaiming-uniform (a = √5), as PyTorch's `nn.Linear` weight.
    pub lora_a: Option<Param<Tensor<2>>>,
    /// `B [d_output, rank]`, zeros.
    pub lora_b: Option<Param<Tensor<2>>>,
    /// Dropout on the adapter's input.
    pub lora_dropout: Dropout,
    /// Scaling factor `s`.
    pub scaling: f64,
    /// Whether `s·(BA)ᵀ` is currently folded into `weight`.
    pub merged: bool,
}

impl LoraLinearConfig {
    /// Build the layer on `device`.
    pub fn init(&self, device: &Device) -> LoraLinear {
        let weight = self.initializer.init_with(
            [self.d_input, self.d_output],
            Some(self.d_input),
            Some(self.d_output),
            device,
        );
        let bias = self.bias.then(|| {
            self.initializer.init_with(
                [self.d_output],
                Some(self.d_input),
                Some(self.d_output),
                device,
            )
        });
        LoraLinear::from_base(
            weight,
            bias,
            self.rank,
            self.alpha,
            self.dropout,
            self.scaling,
        )
    }
}

impl From<&burn::nn::LinearConfig> for LoraLinearConfig {
    /// The same layer without an adapter; add one with `.with_rank(r)`. (Burn saves both
    /// `LinearLayout`s as `[d_input, d_output]`, the layout this layer holds.)
    fn from(c: &burn::nn::LinearConfig) -> Self {
        LoraLinearConfig::new(c.d_input, c.d_output)
            .with_bias(c.bias)
            .with_initializer(c.initializer.clone())
    }
}

impl LoraLinear {
    /// Wrap an existing base weight `[d_input, d_output]` and bias; A ~ U(±1/√d_input), B = 0.
    pub fn from_base(
        weight: Param<Tensor<2>>,
        bias: Option<Param<Tensor<1>>>,
        rank: usize,
        alpha: f64,
        dropout: f64,
        scaling: Scaling,
    ) -> Self {
        let device = weight.lazy_device();
        let [d_input, d_output] = weight.lazy_shape().dims();
        let (lora_a, lora_b) = if rank > 0 {
            let bound = 1.0 / (d_input as f64).sqrt();
            let a = Tensor::<2>::random(
                [rank, d_input],
                Distribution::Uniform(-bound, bound),
                &device,
            );
            let b = Tensor::<2>::zeros([d_output, rank], &device);
            (Some(Param::from_tensor(a)), Some(Param::from_tensor(b)))
        } else {
            (None, None)
        };
        Self {
            weight,
            bias,
            lora_a,
            lora_b,
            lora_dropout: DropoutConfig::new(dropout).init(),
            scaling: scaling.factor(alpha, rank),
            merged: false,
        }
    }

    /// Wrap a `burn::nn::Linear`, keeping its weights.
    pub fn from_linear(
        base: burn::nn::Linear,
        rank: usize,
        alpha: f64,
        dropout: f64,
        scaling: Scaling,
    ) -> Self {
        Self::from_base(base.weight, base.bias, rank, alpha, dropout, scaling)
    }

    /// Keep a frozen base (weight and bias not trained) in `dtype`, the compute dtype of
    /// half-precision training: [`forward`](Self::forward) casts the base to the input's dtype on
    /// every call, and a frozen base casts to the same values each time, so this changes no
    /// result; it drops the f32 copy and the per-step cast. A trained base is left as it is (its
    /// f32 values are the master weights); call it on the training model, since on a device
    /// without autodiff nothing requires a gradient. Merging into a half-precision base rounds
    /// to it.
    pub fn store_frozen_base_in(mut self, dtype: DType) -> Self {
        if !self.weight.val().is_require_grad() {
            self.weight = self.weight.map(|w| cast_to(w, dtype));
        }
        self.bias = self.bias.map(|b| match b.val().is_require_grad() {
            true => b,
            false => b.map(|b| cast_to(b, dtype)),
        });
        self
    }

    /// The adapter rank (0 without an adapter).
    pub fn rank(&self) -> usize {
        self.lora_a
            .as_ref()
            .map_or(0, |a| a.lazy_shape().dims::<2>()[0])
    }

    /// The layer's tensors in `dt` for a fused op on `device` (the dropout's seed drawn there):
    /// none without an unmerged adapter.
    pub fn fused_parts(&self, dt: DType, device: &Device) -> Option<LoraParts> {
        let (a, b) = match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) if !self.merged => (cast_to(a.val(), dt), cast_to(b.val(), dt)),
            _ => return None,
        };
        Some(LoraParts {
            weight: cast_to(self.weight.val(), dt),
            bias: self.bias.as_ref().map(|b| cast_to(b.val(), dt)),
            a,
            b,
            seed: crate::dropout::dropout_seed(&self.lora_dropout, device),
            keep: 1.0 - self.lora_dropout.prob,
            scale: self.scaling,
        })
    }

    /// `[..., d_input] -> [..., d_output]`. Factored: `B·A` is never formed.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let device = x.device();
        if crate::dropout::on_cubecl(&device) {
            // On a GPU: one op, the adapter's thin products as kernels (for inference too: its
            // composed form took 2.2 ms of a 12.8 ms GPT-2 forward at 1024 tokens on an H100).
            if let Some(parts) = self.fused_parts(x.dtype(), &device) {
                return parts.forward(x);
            }
        }
        // Weights are used in the input's dtype (half-precision compute, f32 master weights).
        let dt = x.dtype();
        let weight = cast_to(self.weight.val(), dt);
        let bias = self.bias.as_ref().map(|b| cast_to(b.val(), dt));
        let (a, b) = match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) if !self.merged => (cast_to(a.val(), dt), cast_to(b.val(), dt)),
            _ => return linear(x, weight, bias),
        };
        let base = linear(x.clone(), weight, bias);
        let xa = linear(crate::dropout(&self.lora_dropout, x), a.transpose(), None);
        // Scale the rank-wide `x·Aᵀ`, not the output-wide product: same value, r/out of the work.
        base + linear(xa.mul_scalar(self.scaling), b.transpose(), None)
    }
}

/// `x·W + bias` for x `[..., d_input]`, W `[d_input, d_output]` -> `[..., d_output]`, as one
/// `[rows, d_input]` product ([`crate::matmul::matmul`]; PyTorch's `F.linear` flattens the same
/// way). Burn's `linear` keeps a 3-D input as a batched product with W broadcast: for minGPT's
/// `[64, 19, 48]` that is 64 products of 19 rows, and W's gradient 64 partial products and a sum.
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = crate::matmul::matmul(x.reshape([rows, d_in]), weight);
    let y = match bias {
        Some(bias) => y + bias.unsqueeze(),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// Configuration of a [`LoraEmbedding`]; the first fields are `burn::nn::EmbeddingConfig`'s.
#[derive(Config, Debug)]
pub struct LoraEmbeddingConfig {
    /// Number of embeddings (rows).
    pub n_embedding: usize,
    /// Embedding size.
    pub d_model: usize,
    /// Base weight initializer (default: `burn::nn::Embedding`'s, N(0, 1)).
    #[config(default = "Initializer::Normal{mean:0.0, std:1.0}")]
    pub initializer: Initializer,
    /// LoRA rank; 0 gives exactly the plain embedding.
    #[config(default = 0)]
    pub rank: usize,
    /// LoRA alpha.
    #[config(default = 1.0)]
    pub alpha: f64,
    /// Scaling convention.
    #[config(default = "Scaling::AlphaOverRank")]
    pub scaling: Scaling,
}

/// Embedding with a LoRA adapter (labml / PEFT layout).
///
/// Row `i` is `W[i] + s · (B A)[:, i]`; `weight [n_embedding, d_model]` as `burn::nn::Embedding`.
#[derive(Module, Debug)]
pub struct LoraEmbedding {
    /// Base table `[n_embedding, d_model]`.
    pub weight: Param<Tensor<2>>,
    /// `A [rank, n_embedding]`, N(0, 1).
    pub lora_a: Option<Param<Tensor<2>>>,
    /// `B [d_model, rank]`, zeros.
    pub lora_b: Option<Param<Tensor<2>>>,
    /// Scaling factor `s`.
    pub scaling: f64,
    /// Whether `s·(BA)ᵀ` is currently folded into `weight`.
    pub merged: bool,
}

impl LoraEmbeddingConfig {
    /// Build the layer on `device`.
    pub fn init(&self, device: &Device) -> LoraEmbedding {
        let weight = self
            .initializer
            .init([self.n_embedding, self.d_model], device);
        LoraEmbedding::from_base(weight, self.rank, self.alpha, self.scaling)
    }
}

impl From<&burn::nn::EmbeddingConfig> for LoraEmbeddingConfig {
    /// The same table without an adapter; add one with `.with_rank(r)`.
    fn from(c: &burn::nn::EmbeddingConfig) -> Self {
        LoraEmbeddingConfig::new(c.n_embedding, c.d_model).with_initializer(c.initializer.clone())
    }
}

impl LoraEmbedding {
    /// Wrap an existing table `[n_embedding, d_model]`; A ~ N(0, 1), B = 0.
    pub fn from_base(weight: Param<Tensor<2>>, rank: usize, alpha: f64, scaling: Scaling) -> Self {
        let device = weight.lazy_device();
        let [n, d] = weight.lazy_shape().dims();
        let (lora_a, lora_b) = if rank > 0 {
            let a = Tensor::<2>::random([rank, n], Distribution::Normal(0.0, 1.0), &device);
            let b = Tensor::<2>::zeros([d, rank], &device);
            (Some(Param::from_tensor(a)), Some(Param::from_tensor(b)))
        } else {
            (None, None)
        };
        Self {
            weight,
            lora_a,
            lora_b,
            scaling: scaling.factor(alpha, rank),
            merged: false,
        }
    }

    /// Wrap a `burn::nn::Embedding`, keeping its table.
    pub fn from_embedding(
        base: burn::nn::Embedding,
        rank: usize,
        alpha: f64,
        scaling: Scaling,
    ) -> Self {
        Self::from_base(base.weight, rank, alpha, scaling)
    }

    /// The adapter rank (0 without an adapter).
    pub fn rank(&self) -> usize {
        self.lora_a
            .as_ref()
            .map_or(0, |a| a.lazy_shape().dims::<2>()[0])
    }

    /// `[batch, seq]` ids -> `[batch, seq, d_model]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let base = embedding(self.weight.val(), ids.clone());
        match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) if !self.merged => {
                let xa = embedding(a.val().transpose(), ids);
                base + linear(xa.mul_scalar(self.scaling), b.val().transpose(), None)
            }
            _ => base,
        }
    }
}
