//! LoRA for a model you did not write (recipe D): an MLP built only from `burn::nn`, trained on a
//! synthetic task, then adapted to a shifted task through both of lora-core's routes.
//!
//! ```sh
//! cargo run --release --example any_model            # flex (CPU); or: -- wgpu
//! ```
//!
//! Task A: 4 classes, `label = argmax(x · T)` for a fixed random teacher `T [16, 4]`, `x ~ N(0, I)`.
//! Task B: the same with the feature pairs (0, 1) and (2, 3) of `x` rotated by 90° before the
//! teacher sees them: a rank-4 change of the input, which a rank-4 adapter can learn.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::store::ModuleRecord;
use burn::tensor::{Device, DeviceKind, Int, Tensor, TensorData};
use lora_core::inject::{adapted_modules, merge, save_adapter};
use lora_core::utils::{is_lora_path, params_by_path};
use lora_core::{
    InjectConfig, LoraLinear, LoraLinearConfig, LoraMerge, inject, mark_only_lora_as_trainable,
    param_report,
};
use rand::{Rng, SeedableRng};

const D_IN: usize = 16;
const CLASSES: usize = 4;

/// The user's model: nothing LoRA about it.
#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    head: Linear,
    act: Relu,
}

fn configs() -> [LinearConfig; 3] {
    [
        LinearConfig::new(D_IN, 64),
        LinearConfig::new(64, 64),
        LinearConfig::new(64, CLASSES),
    ]
}

impl Mlp {
    fn new(device: &Device) -> Self {
        let [c1, c2, c3] = configs();
        Mlp {
            fc1: c1.init(device),
            fc2: c2.init(device),
            head: c3.init(device),
            act: Relu::new(),
        }
    }
    /// `[n, 16]` → logits `[n, 4]`.
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = self.act.forward(self.fc1.forward(x));
        let x = self.act.forward(self.fc2.forward(x));
        self.head.forward(x)
    }
}

/// Route 1, drop-in: the same struct with the field types swapped (and the same field names, so
/// the record the plain model saved loads unchanged).
#[derive(Module, Debug)]
struct LoraMlp {
    fc1: LoraLinear,
    fc2: LoraLinear,
    head: LoraLinear,
    act: Relu,
}

impl LoraMlp {
    fn new(device: &Device, rank: usize, alpha: f64) -> Self {
        let lora = |c: &LinearConfig| {
            LoraLinearConfig::from(c)
                .with_rank(rank)
                .with_alpha(alpha)
                .init(device)
        };
        let [c1, c2, c3] = configs();
        LoraMlp {
            fc1: lora(&c1),
            fc2: lora(&c2),
            head: lora(&c3),
            act: Relu::new(),
        }
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = self.act.forward(self.fc1.forward(x));
        let x = self.act.forward(self.fc2.forward(x));
        self.head.forward(x)
    }
    fn merge(self) -> Self {
        LoraMlp {
            fc1: self.fc1.merge(),
            fc2: self.fc2.merge(),
            head: self.head.merge(),
            act: self.act,
        }
    }
}

/// Inputs `[n, 16]` (host) and labels for task A (`shifted = false`) or B.
struct Data {
    x: Vec<f32>,
    y: Vec<i64>,
}

fn make_data(n: usize, shifted: bool, teacher: &[f32], rng: &mut rand::rngs::StdRng) -> Data {
    let mut x = vec![0f32; n * D_IN];
    let mut y = vec![0i64; n];
    for i in 0..n {
        let row = &mut x[i * D_IN..(i + 1) * D_IN];
        for v in row.iter_mut() {
            // Box-Muller: N(0, 1).
            let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
            *v = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
        }
        let mut seen = row.to_vec();
        if shifted {
            (seen[0], seen[1]) = (-row[1], row[0]);
            (seen[2], seen[3]) = (-row[3], row[2]);
        }
        let score = |c: usize| {
            (0..D_IN)
                .map(|k| seen[k] * teacher[k * CLASSES + c])
                .sum::<f32>()
        };
        y[i] = (0..CLASSES)
            .max_by(|&a, &b| score(a).total_cmp(&score(b)))
            .unwrap() as i64;
    }
    Data { x, y }
}

fn tensors(
    d: &Data,
    range: std::ops::Range<usize>,
    device: &Device,
) -> (Tensor<2>, Tensor<1, Int>) {
    let n = range.len();
    let x = TensorData::new(
        d.x[range.start * D_IN..range.end * D_IN].to_vec(),
        [n, D_IN],
    );
    let y = TensorData::new(d.y[range].to_vec(), [n]);
    (Tensor::from_data(x, device), Tensor::from_data(y, device))
}

/// Fraction of `data` classified right.
fn accuracy(forward: impl Fn(Tensor<2>) -> Tensor<2>, data: &Data, device: &Device) -> f64 {
    let (x, y) = tensors(data, 0..data.y.len(), device);
    let pred = forward(x).argmax(1).reshape([data.y.len()]);
    let right = pred.equal(y).int().sum().into_scalar::<i64>();
    right as f64 / data.y.len() as f64
}

/// The test sets of tasks A and B.
struct Tests<'a> {
    a: &'a Data,
    b: &'a Data,
    device: &'a Device,
}

impl Tests<'_> {
    /// Print what LoRA training on B gave: accuracies of the tuned and merged model, the largest
    /// |merged − unmerged| logit over the first 256 inputs of B, and how far the base moved.
    fn report<M: Module>(
        &self,
        forward: impl Fn(&M, Tensor<2>) -> Tensor<2>,
        [before, tuned, merged]: [&M; 3],
        steps: usize,
    ) {
        let acc = |m: &M, d: &Data| accuracy(|x| forward(m, x), d, self.device);
        let x = tensors(self.b, 0..256, self.device).0;
        let gap = (forward(tuned, x.clone()) - forward(merged, x))
            .abs()
            .max()
            .into_scalar::<f32>();
        println!(
            "   after {steps} LoRA steps on B: accuracy B {:.2}% (merged {:.2}%, max |merged − unmerged| {gap:.1e}), A {:.2}%; base weights moved by {:e}",
            100.0 * acc(tuned, self.b),
            100.0 * acc(merged, self.b),
            100.0 * acc(tuned, self.a),
            base_moved(before, tuned)
        );
    }
}

/// AdamW on cross-entropy, batches of 128 in order, `steps` steps.
fn train<M: Module>(
    mut model: M,
    forward: impl Fn(&M, Tensor<2>) -> Tensor<2>,
    data: &Data,
    steps: usize,
    lr: f64,
    device: &Device,
) -> M {
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let batches = data.y.len() / 128;
    for step in 0..steps {
        let b = step % batches;
        let (x, y) = tensors(data, b * 128..(b + 1) * 128, device);
        let loss = loss_fn.forward(forward(&model, x), y);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    model
}

/// Largest change of any non-LoRA parameter between two versions of a model.
fn base_moved<M: Module>(before: &M, after: &M) -> f32 {
    let base = |m: &M| {
        params_by_path(m, |p, _| {
            !is_lora_path(&p.split('.').map(str::to_string).collect::<Vec<_>>())
        })
    };
    base(before)
        .iter()
        .zip(base(after))
        .flat_map(|((_, _, a), (_, _, b))| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .collect::<Vec<_>>()
        })
        .fold(0.0, f32::max)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t0 = std::time::Instant::now();
    let device = match std::env::args().nth(1).as_deref() {
        None | Some("flex") => Device::flex(),
        Some("wgpu") => Device::wgpu(DeviceKind::DefaultDevice),
        Some(other) => return Err(format!("unknown backend '{other}' (flex, wgpu)").into()),
    }
    .autodiff();
    device.seed(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let teacher: Vec<f32> = (0..D_IN * CLASSES)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let (train_a, test_a) = (
        make_data(8192, false, &teacher, &mut rng),
        make_data(2048, false, &teacher, &mut rng),
    );
    let (train_b, test_b) = (
        make_data(8192, true, &teacher, &mut rng),
        make_data(2048, true, &teacher, &mut rng),
    );

    // The user's model, trained on task A.
    let mlp = train(
        Mlp::new(&device),
        Mlp::forward,
        &train_a,
        1500,
        3e-3,
        &device,
    );
    let acc = |m: &Mlp, d: &Data| accuracy(|x| m.forward(x), d, &device);
    println!(
        "base MLP ({} params) trained on task A: accuracy A {:.2}%, shifted task B {:.2}%",
        mlp.num_params(),
        100.0 * acc(&mlp, &test_a),
        100.0 * acc(&mlp, &test_b)
    );
    let (rank, alpha, steps, lr) = (4, 8.0, 600, 3e-3);
    let tests = Tests {
        a: &test_a,
        b: &test_b,
        device: &device,
    };

    // Route 1: drop-in types. Save the plain model, load its record into the LoRA struct.
    println!("\n1. drop-in: LoraLinear fields, the plain model's record loaded unchanged");
    let dir = std::env::temp_dir().join(format!("any-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let record_file = dir.join("mlp.bpk");
    mlp.clone().save_file(&record_file)?;
    let record = ModuleRecord::load(&record_file)?.allow_partial(true);
    let lora = LoraMlp::new(&device, rank, alpha).try_load_record(record)?;
    let lora = mark_only_lora_as_trainable(lora);
    println!("   {}", param_report(&lora));
    let acc1 = |m: &LoraMlp, d: &Data| accuracy(|x| m.forward(x), d, &device);
    println!(
        "   loaded (B = 0, so the plain model's outputs), before LoRA: accuracy B {:.2}%",
        100.0 * acc1(&lora, &test_b)
    );
    let tuned = train(lora.clone(), LoraMlp::forward, &train_b, steps, lr, &device);
    let merged = tuned.clone().merge();
    tests.report(LoraMlp::forward, [&lora, &tuned, &merged], steps);

    // Route 2: no code change. Inject adapters into the user's own `Mlp`.
    println!(
        "\n2. inject: no code change, adapters on every Linear through Burn's reparameterization"
    );
    let cfg = InjectConfig::new(rank, alpha).with_targets(&["all-linear"])?;
    let injected = inject(mlp.clone(), &cfg)?;
    println!("   adapted: {}", adapted_modules(&injected).join(", "));
    println!("   {}", param_report(&injected));
    let tuned = train(injected.clone(), Mlp::forward, &train_b, steps, lr, &device);
    let adapter_file = dir.join("adapter.safetensors");
    save_adapter(&tuned, &cfg, &adapter_file)?;
    let merged = merge(tuned.clone());
    tests.report(Mlp::forward, [&injected, &tuned, &merged], steps);
    println!(
        "   adapter file: {} bytes (A / B only, PEFT names)",
        std::fs::metadata(&adapter_file)?.len()
    );
    std::fs::remove_dir_all(&dir)?;
    println!("\ntotal {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
