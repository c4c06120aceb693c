//! Model-wide LoRA helpers that work on any Burn [`Module`].

use burn::backend::DispatchDevice;
use burn::backend::ExecutionError;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Bool, DType, Device, Tensor, TensorData};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Whether a parameter path (`["h", "0", "attn", "c_attn", "lora_a"]`) is a LoRA factor.
/// Also true for the factors [`inject`](crate::inject) attaches (`["fc1", "weight", "lora", "a"]`).
pub fn is_lora_path(path: &[String]) -> bool {
    path.last()
        .is_some_and(|name| name.starts_with("lora_a") || name.starts_with("lora_b"))
        || crate::inject::is_adapter_path(path)
}

/// Tracks the module path while a visitor or mapper walks the tree.
#[derive(Default)]
pub(crate) struct PathStack(pub(crate) Vec<String>);

impl PathStack {
    pub(crate) fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    pub(crate) fn exit(&mut self) {
        self.0.pop();
    }
}

struct RequireGradByPath<F: Fn(&[String]) -> bool> {
    path: PathStack,
    trainable: F,
}

impl<F: Fn(&[String]) -> bool> ModuleMapper for RequireGradByPath<F> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.set_require_grad((self.trainable)(&self.path.0))
    }
}

/// Set `require_grad` on every float parameter from its path (`["h", "0", "attn", "c_attn", "weight"]`).
pub fn set_trainable_by_path<M: Module>(model: M, trainable: impl Fn(&[String]) -> bool) -> M {
    model.map(&mut RequireGradByPath {
        path: PathStack::default(),
        trainable,
    })
}

/// Freeze everything but the LoRA factors (loralib's `mark_only_lora_as_trainable`, the exercise's
/// `get_lora_model`).
pub fn mark_only_lora_as_trainable<M: Module>(model: M) -> M {
    set_trainable_by_path(model, is_lora_path)
}

/// Freeze the LoRA factors and train everything else (pre-training with adapters attached).
pub fn freeze_lora<M: Module>(model: M) -> M {
    set_trainable_by_path(model, |p| !is_lora_path(p))
}

/// Parameter counts of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParamReport {
    /// All float parameters.
    pub total: usize,
    /// Parameters that require a gradient.
    pub trainable: usize,
    /// LoRA factors (A and B), trainable or not.
    pub lora: usize,
}

impl ParamReport {
    /// Trainable share of all parameters, in percent.
    pub fn trainable_percent(&self) -> f64 {
        100.0 * self.trainable as f64 / self.total.max(1) as f64
    }
}

impl std::fmt::Display for ParamReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4} || lora params: {}",
            self.trainable,
            self.total,
            self.trainable_percent(),
            self.lora
        )
    }
}

/// The largest buffer one kernel may bind on `device`, bytes: a cubecl device's storage-binding
/// limit (128 MiB on Mesa's llvmpipe; a Vulkan GPU's whole memory), `None` on the CPU backends,
/// which have none.
pub fn max_binding_bytes(device: &Device) -> Option<u64> {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Cube(cube) => Some(cube.client().properties().memory.max_page_size),
        #[allow(unreachable_patterns)] // a build with the cubecl backend only
        _ => None,
    }
}

/// A buffer above its device's binding limit ([`max_binding_bytes`]): kernels cannot bind it, and
/// the driver would reject the first launch that tries.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "{what} takes {:.1} MiB, above the {:.1} MiB this device binds per buffer",
    *bytes as f64 / MIB,
    *limit as f64 / MIB
)]
pub struct TooLargeForDevice {
    /// The buffer: a parameter's path and shape, or an activation's name.
    pub what: String,
    pub bytes: u64,
    pub limit: u64,
}

const MIB: f64 = (1u64 << 20) as f64;

/// Checks that `buffers` (name, bytes) fit `device`'s binding limit ([`max_binding_bytes`]); the
/// first that does not is the error. Check before the tensors exist: a kernel that binds one too
/// large fails on the driver's thread, mid-launch.
pub fn check_buffers(buffers: &[(String, u64)], device: &Device) -> Result<(), TooLargeForDevice> {
    let Some(limit) = max_binding_bytes(device) else {
        return Ok(());
    };
    match buffers.iter().find(|(_, b)| *b > limit) {
        Some((what, bytes)) => Err(TooLargeForDevice {
            what: what.clone(),
            bytes: *bytes,
            limit,
        }),
        None => Ok(()),
    }
}

struct Counter {
    path: PathStack,
    report: ParamReport,
}

impl ModuleVisitor for Counter {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.lazy_shape().num_elements();
        self.report.total += n;
        if param.val().is_require_grad() {
            self.report.trainable += n;
        }
        if is_lora_path(&self.path.0) {
            self.report.lora += n;
        }
    }
}

/// Count total / trainable / LoRA parameters (PEFT's `print_trainable_parameters`).
///
/// "Trainable" is read from the tensors, so call it on the model on its autodiff (training) device.
pub fn param_report<M: Module>(model: &M) -> ParamReport {
    let mut counter = Counter {
        path: PathStack::default(),
        report: ParamReport {
            total: 0,
            trainable: 0,
            lora: 0,
        },
    };
    model.visit(&mut counter);
    counter.report
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

/// Each gradient times `coef` (`[1]`), or all zeros where `zero` (`[1]`) is true (times `coef`
/// a non-finite gradient could be NaN): one element-wise op a gradient.
struct Scale<'a> {
    grads: &'a mut GradientsParams,
    coef: Tensor<1>,
    zero: Option<Tensor<1, Bool>>,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            let shape = g.shape();
            let scaled = g * self.coef.clone().reshape([1; D]);
            let scaled = match &self.zero {
                Some(zero) => scaled.mask_fill(zero.clone().reshape([1; D]).expand(shape), 0.0),
                None => scaled,
            };
            self.grads.register::<D>(param.id, scaled);
        }
    }
}

/// A read of a small tensor's values started now and waited for later ([`StartedRead::wait`]):
/// its copy is queued behind the work queued so far, so the host can queue more (the next
/// training step) while the device gets there, instead of the device idling from each read until
/// the host has queued its next work. On an H100, GPT-2's f16 LoRA step ran 54.5 ms with each
/// step's loss read this way, as without any reads, against 61-64 ms read at once.
///
/// Reads become eager for the whole process: [`start`](Self::start) declares Burn's runtime kind
/// [`RuntimeKind::Async`](burn_std::RuntimeKind::Async), under which a GPU read queues its copy
/// when first polled. Under the default kind the copy waits for the bytes' first access, so the
/// read would only start in `wait`.
pub struct StartedRead(Read);

type ReadFuture = Pin<Box<dyn Future<Output = Result<TensorData, ExecutionError>> + Send>>;

enum Read {
    Pending(ReadFuture),
    Ready(Result<TensorData, ExecutionError>),
}

impl StartedRead {
    /// Starts reading `t` back (its queued work flushed to the device, a copy of it queued).
    pub fn start<const D: usize>(t: Tensor<D>) -> Self {
        burn_std::set_runtime_kind(burn_std::RuntimeKind::Async);
        let mut read: ReadFuture = Box::pin(t.into_data_async());
        // The first poll queues the copy (the host backends finish it there).
        match read.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(data) => Self(Read::Ready(data)),
            Poll::Pending => Self(Read::Pending(read)),
        }
    }

    /// The values as f32, waiting for the device to reach the copy.
    ///
    /// # Panics
    /// Where the device failed to run the work before the copy (as `into_data` does).
    pub fn wait(self) -> Vec<f32> {
        let data = match self.0 {
            Read::Ready(data) => data,
            Read::Pending(read) => burn::tensor::read_sync(read),
        };
        let data = data.unwrap_or_else(|e| panic!("reading a tensor back: {e:?}"));
        data.iter::<f32>().collect()
    }
}

/// Dynamic loss scaling for half-precision training (PyTorch's `GradScaler`): the loss is
/// multiplied by [`LossScaler::scale`] before the backward pass so that small gradients do not
/// flush to zero in f16, and [`LossScaler::unscale`] divides the gradients by it before clipping
/// and the optimizer step. A step whose gradients are not all finite halves the scale; after
/// `interval` good steps in a row it doubles (PyTorch: from 2¹⁶, every 2,000 steps).
///
/// Reading a step's overflow flag waits for its backward pass, so only the first step at a new
/// scale is checked before it is taken, and skipped where it overflowed, as PyTorch does. At a
/// scale a step has passed, the step is taken at once and its flag read back with its loss, when
/// the caller waits for that ([`SettleRead`]: e.g. after queueing the next step): an overflowed
/// step's gradients are zeroed on the device, and the optimizer takes a zero-gradient step.
///
/// A step: [`unscale`](Self::unscale) (on the device; says whether to take the step at once),
/// the optimizer step if so, then [`settle_start`](Self::settle_start) and
/// [`settle_finish`](Self::settle_finish) (or [`settle`](Self::settle), both at once).
#[derive(Debug, Clone)]
pub struct LossScaler {
    scale: f64,
    good: usize,
    interval: usize,
    /// The scale a step last passed at.
    trusted: Option<f64>,
    /// This step's flag (`[1]`: 1 finite, 0 not) and scale, from [`unscale`](Self::unscale), and
    /// whether it is taken before its flag is read.
    current: Option<(Tensor<1>, f64, bool)>,
}

/// A step's loss and overflow flag on their way back ([`LossScaler::settle_start`]).
pub struct SettleRead {
    read: StartedRead,
    /// The step's scale and whether it was taken before its flag was read; `None`: no gradients.
    step: Option<(f64, bool)>,
}

/// What [`LossScaler::settle_finish`] read back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unscaled {
    /// The step's loss.
    pub loss: f64,
    /// Whether to take the step (false: it overflowed at a new scale; skip it). Always true for
    /// a step [`LossScaler::unscale`] said to take at once.
    pub take: bool,
    /// The scale at which this step overflowed after it was taken (it ran as a zero-gradient
    /// step).
    pub late_overflow: Option<f64>,
}

impl LossScaler {
    /// A scaler starting at `scale`, doubling it after `interval` good steps.
    pub fn new(scale: f64, interval: usize) -> Self {
        Self {
            scale,
            good: 0,
            interval: interval.max(1),
            trusted: None,
            current: None,
        }
    }

    /// PyTorch's `GradScaler` defaults for f16: from 2¹⁶, doubling every 2,000 good steps.
    pub fn f16() -> Self {
        Self::new(65_536.0, 2_000)
    }

    /// The factor to multiply the loss by before the backward pass.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Divide `grads` (of a loss times [`LossScaler::scale`]) by the scale on the device, or zero
    /// them where any is not finite; with `max_norm`, the unscaled gradients' total L2 norm is
    /// clipped to it in the same pass ([`clip_grad_norm`]'s coefficient; PyTorch's `unscale_`
    /// then `clip_grad_norm_`). Reads nothing back. Returns whether to take the step now, before
    /// its flag is read: true at a scale a step has passed, false where
    /// [`settle_finish`](Self::settle_finish) must read it first.
    pub fn unscale<M: Module>(
        &mut self,
        model: &M,
        grads: &mut GradientsParams,
        max_norm: Option<f64>,
    ) -> bool {
        let scale = self.scale;
        let mut sq = SquaredNorm { grads, total: None };
        model.visit(&mut sq);
        let Some(total) = sq.total else {
            self.current = None;
            return true;
        };
        let finite = total.clone().is_finite();
        let flag = finite.clone().float();
        let coef = match max_norm {
            // The scaled gradients' norm is `scale` times the unscaled one.
            Some(max_norm) => clip_coef(total.sqrt().div_scalar(scale), max_norm).div_scalar(scale),
            None => Tensor::<1>::from_floats([(1.0 / scale) as f32], &flag.device()),
        };
        let zero = Some(finite.bool_not());
        model.visit(&mut Scale { grads, coef, zero });
        let now = self.trusted == Some(scale);
        self.current = Some((flag, scale, now));
        now
    }

    /// Starts reading the step's `loss` `[1]` and overflow flag back ([`StartedRead`]).
    pub fn settle_start(&mut self, loss: Tensor<1>) -> SettleRead {
        let current = self.current.take();
        let values = match &current {
            Some((flag, ..)) => Tensor::cat(vec![loss, flag.clone()], 0),
            None => loss,
        };
        SettleRead {
            read: StartedRead::start(values),
            step: current.map(|(_, scale, taken)| (scale, taken)),
        }
    }

    /// Waits for a [`SettleRead`] and updates the scale: halved where the step overflowed,
    /// doubled after `interval` good steps.
    pub fn settle_finish(&mut self, read: SettleRead) -> Unscaled {
        let values = read.read.wait();
        let mut out = Unscaled {
            loss: values[0] as f64,
            take: true,
            late_overflow: None,
        };
        if let Some((scale, taken)) = read.step {
            match values[1] != 0.0 {
                true => self.passed(scale),
                false => {
                    self.overflowed(scale);
                    match taken {
                        true => out.late_overflow = Some(scale),
                        false => out.take = false,
                    }
                }
            }
        }
        out
    }

    /// [`settle_start`](Self::settle_start) and [`settle_finish`](Self::settle_finish) at once.
    pub fn settle(&mut self, loss: Tensor<1>) -> Unscaled {
        let read = self.settle_start(loss);
        self.settle_finish(read)
    }

    fn passed(&mut self, scale: f64) {
        self.trusted = Some(scale);
        self.good += 1;
        if self.good >= self.interval {
            self.scale *= 2.0;
            self.good = 0;
        }
    }

    fn overflowed(&mut self, scale: f64) {
        self.scale = self.scale.min(scale / 2.0).max(1.0);
        self.good = 0;
        self.trusted = None;
    }
}

/// Clip the total L2 norm of all gradients to `max_norm` (PyTorch's `clip_grad_norm_`:
/// coefficient `max_norm / (norm + 1e-6)`, applied only when below 1).
///
/// Returns the pre-clip norm as a `[1]` tensor (read it only when needed: it syncs the device).
/// Burn's own `GradientClipping::Norm` clips each tensor separately, which is not the same.
pub fn clip_grad_norm<M: Module>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> Option<Tensor<1>> {
    let mut sq = SquaredNorm { grads, total: None };
    model.visit(&mut sq);
    let norm = sq.total?.sqrt();
    model.visit(&mut Scale {
        grads,
        coef: clip_coef(norm.clone(), max_norm),
        zero: None,
    });
    Some(norm)
}

/// `min(1, max_norm / (norm + 1e-6))` (`[1]`): PyTorch's `clip_grad_norm_` coefficient.
fn clip_coef(norm: Tensor<1>, max_norm: f64) -> Tensor<1> {
    norm.add_scalar(1e-6)
        .recip()
        .mul_scalar(max_norm)
        .clamp_max(1.0)
}

/// `t` in `dtype` (`t` itself when it already is): f32 weights meet half-precision activations
/// this way, their gradient flowing back in f32.
pub fn cast_to<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// A Flex tensor in row-major order (a copy only where it is a strided view): what the host
/// kernels that read Flex's storage as a slice take.
pub fn flex_contiguous(
    t: burn::backend::tensor::FloatTensor<burn::backend::Flex>,
) -> burn::backend::tensor::FloatTensor<burn::backend::Flex> {
    match t.is_contiguous() {
        true => t,
        false => t.to_contiguous(),
    }
}

/// 64-bit FNV-1a of `bytes`: stable across runs, platforms and Rust versions.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A stable [`ParamId`](burn::module::ParamId) from a parameter path.
fn path_id(path: &str) -> burn::module::ParamId {
    burn::module::ParamId::from(fnv1a(path.as_bytes()))
}

struct PathIds(PathStack);

impl ModuleMapper for PathIds {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.0.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.0.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (_, value, mapper) = param.consume();
        Param::from_mapped_value(path_id(&self.0.0.join(".")), value, mapper)
    }
}

/// Give every float parameter an id derived from its module path, so optimizer state saved by
/// one process (`ModuleOptimizer::to_record`, keyed by id) matches the same model built by
/// another: what resuming a run needs. Trainable flags are kept.
pub fn path_param_ids<M: Module>(model: M) -> M {
    model.map(&mut PathIds(PathStack::default()))
}

/// A float parameter's values by path: `(path, shape, f32 values)`.
pub type NamedValues = (String, Vec<usize>, Vec<f32>);

/// Parameter values keyed by path: `path → (shape, f32 values)`.
pub type ValuesByPath = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

struct Collect<F: Fn(&str, bool) -> bool> {
    path: PathStack,
    keep: F,
    out: Vec<NamedValues>,
}

impl<F: Fn(&str, bool) -> bool> ModuleVisitor for Collect<F> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.0.join(".");
        let t = param.val();
        if (self.keep)(&path, t.is_require_grad()) {
            let shape = t.dims().to_vec();
            let values = t
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            self.out.push((path, shape, values));
        }
    }
}

/// The float parameters for which `keep(path, trainable)` holds, by path (`h.0.attn.c_attn.lora_a`).
pub fn params_by_path<M: Module>(model: &M, keep: impl Fn(&str, bool) -> bool) -> Vec<NamedValues> {
    let mut c = Collect {
        path: PathStack::default(),
        keep,
        out: vec![],
    };
    model.visit(&mut c);
    c.out
}

struct Replace<'a> {
    path: PathStack,
    values: &'a ValuesByPath,
    used: usize,
    problems: Vec<String>,
}

impl ModuleMapper for Replace<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.0.join(".");
        let Some((shape, values)) = self.values.get(&path) else {
            return param;
        };
        self.used += 1;
        let dims = param.lazy_shape().dims::<D>().to_vec();
        if &dims != shape {
            self.problems
                .push(format!("'{path}' has shape {shape:?}, the model {dims:?}"));
            return param;
        }
        param.map(|t| {
            let data = burn::tensor::TensorData::new(values.clone(), shape.clone());
            let new = Tensor::<D>::from_data(data, &t.device());
            if t.is_require_grad() {
                new.require_grad()
            } else {
                new
            }
        })
    }
}

/// Replace parameter values by path; every entry of `values` must name a parameter of the same
/// shape (errors list each problem).
pub fn load_params_by_path<M: Module>(model: M, values: &ValuesByPath) -> Result<M, String> {
    let mut r = Replace {
        path: PathStack::default(),
        values,
        used: 0,
        problems: vec![],
    };
    let model = model.map(&mut r);
    if r.used < values.len() {
        r.problems.push(format!(
            "{} tensors name no parameter of the model",
            values.len() - r.used
        ));
    }
    if r.problems.is_empty() {
        Ok(model)
    } else {
        Err(r.problems.join("; "))
    }
}

/// safetensors bytes of f32 `tensors` (`(name, shape, values)`), with `{"format": "pt"}` and
/// `meta` as header metadata (transformers / PEFT require `format`).
pub fn safetensors_bytes(
    tensors: &[NamedValues],
    meta: &[(&str, String)],
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, shape, v)| {
            // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is exact
            // (safetensors is little-endian, as every supported target is).
            let bytes: &[u8] = unsafe {
                std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(&v[..]))
            };
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (k.clone(), view))
        })
        .collect::<Result<_, _>>()?;
    let mut header = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    header.extend(meta.iter().map(|(k, v)| (k.to_string(), v.clone())));
    safetensors::serialize(views, Some(header))
}

/// A safetensors tensor's values as f32 (f16 / bf16 converted); `Err` names the dtype otherwise.
pub fn tensor_f32(view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>, String> {
    use safetensors::Dtype;
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        Dtype::F16 => Ok(data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        Dtype::BF16 => Ok(data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        other => Err(format!("dtype {other:?}, expected F32, F16 or BF16")),
    }
}

/// Write `bytes` to `path` atomically: a temporary sibling, then a rename (never half-written).
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::path::Path;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
