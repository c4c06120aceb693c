//! The dropout functions against Burn's random stream. Flex's generator is global to the process,
//! so these run in a test binary of their own, one at a time: a test elsewhere drawing between
//! `seed` and the draws would change the masks.

use burn::module::Module;
use burn::tensor::DType;
use burn::tensor::{Device, Tensor};
use lora_core::{dropout, dropout_folded, dropout_mask};
use std::sync::Mutex;

static RNG: Mutex<()> = Mutex::new(());

fn dev() -> Device {
    Device::flex()
}

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

#[test]
fn host_dropout_keeps_the_law_the_seed_and_the_gradient() {
    let _rng = RNG.lock().unwrap();
    let d = dev().autodiff();
    let drop = burn::nn::DropoutConfig::new(0.3).init();
    let x = Tensor::<2>::ones([200, 500], &d).require_grad();
    d.seed(5);
    let y = dropout(&drop, x.clone());
    let v = vals(y.clone());
    let zeros = v.iter().filter(|&&a| a == 0.0).count() as f64 / v.len() as f64;
    assert!((zeros - 0.3).abs() < 0.01, "dropped share {zeros}");
    assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.7).abs() < 1e-6));
    // The gradient is the mask itself.
    let g = x.grad(&y.clone().sum().backward()).unwrap();
    assert_eq!(vals(g), v);
    // Same seed, same mask; another seed, another.
    d.seed(5);
    assert_eq!(vals(dropout(&drop, x.clone())), v);
    d.seed(6);
    assert_ne!(vals(dropout(&drop, x.clone())), v);
    // Identity off the autodiff device and in eval mode.
    let plain = Tensor::<2>::ones([3, 3], &dev());
    assert_eq!(vals(dropout(&drop, plain.clone())), vals(plain));
    let frozen = drop.clone().valid();
    assert_eq!(vals(dropout(&frozen, x.clone())), vals(x));
}

#[test]
fn folded_dropout_is_x_times_the_mask_on_both_host_backends() {
    let _rng = RNG.lock().unwrap();
    #[allow(deprecated)]
    for d in [dev().autodiff(), Device::ndarray().autodiff()] {
        let drop = burn::nn::DropoutConfig::new(0.1).init();
        let x = Tensor::<2>::random([64, 300], burn::tensor::Distribution::Default, &d);
        d.seed(11);
        let mask = dropout_mask::<2>(&drop, [64, 300], &d, DType::F32).unwrap();
        d.seed(11);
        let y = dropout_folded(&drop, x.clone().require_grad());
        assert_eq!(vals(y), vals(x.clone() * mask.clone()));
        let m = vals(mask);
        let dropped = m.iter().filter(|&&a| a == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - 0.1).abs() < 0.01, "dropped share {dropped}");
        assert!(m.iter().all(|&a| a == 0.0 || a == (1.0f64 / 0.9) as f32));
        // Identity in eval mode and off the autodiff device.
        let frozen = drop.clone().valid();
        assert_eq!(vals(dropout_folded(&frozen, x.clone())), vals(x.clone()));
        assert!(dropout_mask::<2>(&frozen, [2, 2], &d, DType::F32).is_none());
        let plain = Tensor::<2>::ones([3, 3], &dev());
        assert_eq!(vals(dropout_folded(&drop, plain.clone())), vals(plain));
    }
}

/// Inside `with_seed_pool` on a GPU device the seeds are rows of one draw (`[SEED_ROW]`):
/// distinct, a function of the device's seed, a new draw once the rows are used up; hashed
/// dropout reads a row's first two values only (the same product as those two as a `[2]` seed).
/// Outside a pool, and on CPU backends, a seed is its own `[2]` draw.
#[test]
fn pooled_seeds_are_rows_of_one_draw() {
    let drop = burn::nn::DropoutConfig::new(0.1).init();
    let flex = dev().autodiff();
    let seed = dropout::with_seed_pool(&flex, || dropout::dropout_seed(&drop, &flex));
    assert_eq!(seed.unwrap().dims(), [2]);
    let d = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice).autodiff();
    let draw = || {
        d.seed(3);
        dropout::with_seed_pool(&d, || {
            (0..150)
                .map(|_| dropout::dropout_seed(&drop, &d).unwrap())
                .collect::<Vec<_>>()
        })
    };
    let seeds = draw();
    assert!(seeds.iter().all(|s| s.dims() == [dropout::SEED_ROW]));
    let firsts: Vec<[f32; 2]> = seeds
        .iter()
        .map(|s| {
            let v = vals(s.clone().narrow(0, 0, 2));
            [v[0], v[1]]
        })
        .collect();
    let distinct: std::collections::HashSet<[u32; 2]> =
        firsts.iter().map(|p| p.map(f32::to_bits)).collect();
    assert_eq!(distinct.len(), firsts.len(), "a seed repeats");
    let again: Vec<Vec<f32>> = draw().into_iter().map(vals).collect();
    assert_eq!(
        again[149],
        vals(seeds[149].clone()),
        "not a function of the seed"
    );
    assert_eq!(dropout::dropout_seed(&drop, &d).unwrap().dims(), [2]);
    let x = Tensor::<2>::random([4, 300], burn::tensor::Distribution::Default, &d);
    let pooled = dropout::hashed(x.clone(), seeds[70].clone(), 0.9);
    let plain = dropout::hashed(x, Tensor::from_floats(firsts[70], &d), 0.9);
    assert_eq!(vals(pooled), vals(plain));
}
