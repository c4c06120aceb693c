//! `--backend` names to Burn devices.

use burn::tensor::{Device, DeviceKind};

/// A compute backend the CLI can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Burn's pure-Rust CPU backend (default).
    Flex,
    /// burn-ndarray (CPU; deprecated upstream, still offered).
    Ndarray,
    /// wgpu: Vulkan / Metal / DX12 / GL, whichever the machine offers.
    Wgpu,
    /// wgpu pinned to Vulkan (SPIR-V); needs the `vulkan` cargo feature.
    Vulkan,
}

impl Backend {
    /// The device for this backend (without autodiff).
    pub fn device(self) -> anyhow::Result<Device> {
        Ok(match self {
            Backend::Flex => Device::flex(),
            #[allow(deprecated)]
            Backend::Ndarray => Device::ndarray(),
            Backend::Wgpu => Device::wgpu(DeviceKind::DefaultDevice),
            #[cfg(feature = "vulkan")]
            Backend::Vulkan => Device::vulkan(DeviceKind::DefaultDevice),
            #[cfg(not(feature = "vulkan"))]
            Backend::Vulkan => anyhow::bail!(
                "--backend vulkan: this binary was built without the `vulkan` feature (cargo build --release -p lora-train --features vulkan)"
            ),
        })
    }

    /// Whether this backend runs on a GPU (its kernels autotune; its memory is not the process's).
    pub fn is_gpu(self) -> bool {
        matches!(self, Backend::Wgpu | Backend::Vulkan)
    }

    /// Makes this backend Burn's default device (`BURN_DEVICE`, unless already set). Burn creates
    /// some tensors on the default device whatever the model's: `ModuleOptimizer::load_record`
    /// (a resumed run's optimizer state) does, and the default is wgpu where it is compiled in.
    /// A CPU run then started a wgpu device (Mesa's llvmpipe threads on CPU-only machines), and
    /// under load its threads raced the process's exit: glibc's "double free or corruption" once
    /// in ~6 resumed runs on a busy 2-core machine (`finetune_resumes_bit_identically_after_sigkill`).
    ///
    /// # Safety
    /// Call before any other thread exists (it sets an environment variable).
    pub unsafe fn pin_default_device(self) {
        if std::env::var_os("BURN_DEVICE").is_none() {
            // SAFETY: no other thread reads or writes the environment (the caller's contract).
            unsafe { std::env::set_var("BURN_DEVICE", self.name()) };
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            Backend::Ndarray => "ndarray",
            Backend::Wgpu => "wgpu",
            Backend::Vulkan => "vulkan",
        }
    }
}

/// Runs `f` on a worker of a Rayon pool (`RAYON_NUM_THREADS` threads, default one per core).
///
/// The CPU backends split kernels with Rayon; called from outside a pool, every split hands its
/// work to a pool thread and sleeps until it is done (a futex wake and wait per kernel, tens of
/// microseconds on the small tensors of a training step). From inside the pool the caller's own
/// thread takes part: the sort demo trains ~13 % faster on one thread (`cargo xtask bench sort`).
/// Falls back to the calling thread if no pool can be built.
pub fn on_worker_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20) // the main thread's size; pool threads get 2 MiB by default
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}
