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
