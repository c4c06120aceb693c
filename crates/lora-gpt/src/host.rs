//! Flex (CPU) kernels of the fused ops: `exp` and GELU forward / backward, with the values of
//! Flex's own ops bit for bit, eight lanes at a time.
//!
//! Flex runs `exp` and `sigmoid` one element at a time through libm's `expf`, a ninth of a minGPT
//! training step. glibc (2.27 on) computes `expf` in double precision as `2^(k/32) · p(r)` (a
//! 32-entry table and a cubic); on x86-64 CPUs with AVX2 and FMA it runs `__expf_fma`, repeated
//! here four doubles at a time with the same fused multiply-adds and roundings. The rest of GELU
//! is the same f32 operations, in the same order, as the composed ops of `fused.rs`. So training
//! is unchanged to the bit: the first call checks `exp` against the platform's `expf` on a sweep
//! of inputs and, where they differ (another libm, no AVX2 / FMA), every kernel here runs the
//! scalar libm form instead.
//!
//! The attention softmax (forward and backward) runs here row by row, in one pass where Flex runs
//! eight and five ops; its row sums and maxima go in sixteen lanes, so its values are within
//! rounding of the composed ops', not equal to the bit.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `0.044715`, the cubic's coefficient in GELU's tanh approximation.
pub(crate) const GELU_A: f64 = 0.044715;
/// [`GELU_A`] as Flex rounds the scalar.
const A: f32 = GELU_A as f32;
/// `3 · 0.044715`, the cubic's derivative, as Flex rounds it.
const A3: f32 = (3.0 * GELU_A) as f32;

/// `2·√(2/π)`: `sigmoid(2u) = (1 + tanh u) / 2`.
pub(crate) fn gelu_c() -> f64 {
    2.0 * (2.0 / std::f64::consts::PI).sqrt()
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// Flex's `sigmoid`, scalar.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn gate(x: f32, c: f32) -> f32 {
    let x3 = x * x * x;
    sigmoid((x + x3 * A) * c)
}

fn gelu1(x: f32, c: f32) -> f32 {
    x * gate(x, c)
}

fn gelu_grad1(x: f32, g: f32, c: f32) -> f32 {
    let s = gate(x, c);
    let slope = ((x * x) * A3 + 1.0) * c;
    let ds = s - s * s;
    g * (s + (x * ds) * slope)
}

/// `x ← exp(x)`.
pub(crate) fn exp(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).with_min_len(4).for_each(exp_serial);
}

/// `x ← exp(x)` on this thread.
fn exp_serial(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::enabled() {
        // SAFETY: `enabled` checked AVX2 and FMA.
        return unsafe { simd::exp(x) };
    }
    x.iter_mut().for_each(|v| *v = v.exp());
}

/// Lanes of the row reductions (sixteen partial maxima or sums: one AVX-512 register).
const LANES: usize = 16;

/// The largest of `x` (NaN where x has one).
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in chunks.by_ref() {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a || v.is_nan() { v } else { *a };
        }
    }
    let tail = chunks.remainder().iter().copied();
    acc.into_iter().chain(tail).fold(
        f32::NEG_INFINITY,
        |m, v| {
            if v > m || v.is_nan() { v } else { m }
        },
    )
}

/// `Σ x`, sixteen partial sums.
#[inline(always)]
fn row_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in chunks.by_ref() {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `Σ x·y`, sixteen partial sums.
#[inline(always)]
fn row_dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut xc, mut yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    for (a, b) in xc.by_ref().zip(yc.by_ref()) {
        for ((s, &a), &b) in acc.iter_mut().zip(a).zip(b) {
            *s += a * b;
        }
    }
    let tail = xc.remainder().iter().zip(yc.remainder());
    acc.iter().sum::<f32>() + tail.map(|(a, b)| a * b).sum::<f32>()
}

/// Rows of `t` elements per parallel task: about [`CHUNK`] elements.
fn rows_per_task(t: usize) -> usize {
    (CHUNK / t.max(1)).max(1)
}

/// Each row `x [.., t]` ← `softmax(x·scale + bias)`, row r taking bias row `r % (bias.len() / t)`
/// (attention scores `[b, h, t, t]` with a `[t, t]` bias): the composed ops (scale, add, max,
/// subtract, exp, sum, divide) in one pass over the row, sums in sixteen lanes.
pub(crate) fn softmax_rows(x: &mut [f32], bias: &[f32], t: usize, scale: f32) {
    let per_task = rows_per_task(t);
    x.par_chunks_mut(per_task * t)
        .enumerate()
        .for_each(|(task, x)| {
            let first = task * per_task;
            #[cfg(target_arch = "x86_64")]
            if simd::v4_enabled() {
                // SAFETY: the CPU has AVX-512 F and DQ.
                return unsafe { softmax_task_v4(x, bias, first, t, scale) };
            }
            softmax_task(x, bias, first, t, scale)
        });
}

/// [`softmax_rows`] on the rows of one task, `first` the index of its first row: scale, bias and
/// max row by row, one `exp` over the task, then the sums and divisions.
#[inline(always)]
fn softmax_task(x: &mut [f32], bias: &[f32], first: usize, t: usize, scale: f32) {
    let bias_rows = bias.len() / t;
    for (i, row) in x.chunks_exact_mut(t).enumerate() {
        let r = (first + i) % bias_rows;
        for (v, &b) in row.iter_mut().zip(&bias[r * t..(r + 1) * t]) {
            *v = *v * scale + b;
        }
        let m = row_max(row);
        row.iter_mut().for_each(|v| *v -= m);
    }
    exp_serial(x);
    for row in x.chunks_exact_mut(t) {
        let sum = row_sum(row);
        row.iter_mut().for_each(|v| *v /= sum);
    }
}

/// [`softmax_task`] compiled for AVX-512 (sixteen lanes a row step).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn softmax_task_v4(x: &mut [f32], bias: &[f32], first: usize, t: usize, scale: f32) {
    softmax_task(x, bias, first, t, scale)
}

/// Softmax's backward pass row by row, in place: `dp ← (p·(dp − Σ dp·p))·scale` (rows of `t`).
pub(crate) fn softmax_grad_rows(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
    let per_task = rows_per_task(t);
    dp.par_chunks_mut(per_task * t)
        .zip(p.par_chunks(per_task * t))
        .for_each(|(dp, p)| {
            #[cfg(target_arch = "x86_64")]
            if simd::v4_enabled() {
                // SAFETY: the CPU has AVX-512 F and DQ.
                return unsafe { softmax_grad_task_v4(p, dp, t, scale) };
            }
            softmax_grad_task(p, dp, t, scale)
        });
}

#[inline(always)]
fn softmax_grad_task(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
    for (dp, p) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
        let d = row_dot(dp, p);
        for (g, &p) in dp.iter_mut().zip(p) {
            *g = (p * (*g - d)) * scale;
        }
    }
}

/// [`softmax_grad_task`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn softmax_grad_task_v4(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
    softmax_grad_task(p, dp, t, scale)
}

/// `v` as the output slice of the kernels below (which write every element).
#[cfg(any(test, target_arch = "x86_64"))]
fn as_out(v: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has f32's layout, and the kernels write only initialised values.
    unsafe { &mut *(v as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// `out = x · sigmoid(c·(x + 0.044715·x³))`, `c = 2·√(2/π)`.
pub(crate) fn gelu(x: &[f32], out: &mut [MaybeUninit<f32>]) {
    let c = gelu_c() as f32;
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .with_min_len(4)
        .for_each(|(out, x)| {
            #[cfg(target_arch = "x86_64")]
            if simd::enabled() {
                // SAFETY: as in `exp`.
                return unsafe { simd::gelu(x, out, c) };
            }
            out.iter_mut().zip(x).for_each(|(o, &x)| {
                o.write(gelu1(x, c));
            });
        });
}

/// `out = g · d gelu(x) / dx`.
pub(crate) fn gelu_grad(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    let c = gelu_c() as f32;
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .with_min_len(4)
        .for_each(|(out, (x, g))| {
            #[cfg(target_arch = "x86_64")]
            if simd::enabled() {
                // SAFETY: as in `exp`.
                return unsafe { simd::gelu_grad(x, g, out, c) };
            }
            for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                o.write(gelu_grad1(x, g, c));
            }
        });
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{A, A3, gelu_grad1, gelu1};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;
    use std::sync::OnceLock;

    /// glibc's `__exp2f_data`: `tab[i] = bits(2^(i/32)) − (i << 47)`.
    static TAB: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];
    /// `32 / ln 2`.
    const INV_LN2_N: u64 = 0x40471547652b82fe;
    /// The cubic in `r`, scaled for `r` in units of `ln 2 / 32`.
    const C0: u64 = 0x3ebc6af84b912394;
    const C1: u64 = 0x3f2ebfce50fac4f3;
    const C2: u64 = 0x3f962e42ff0c52d6;
    /// `1.5 · 2⁵²`: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: u64 = 0x4338000000000000;

    /// Whether the vector kernels run: AVX2 and FMA present and `exp` equal to libm's `expf` on
    /// the check's sweep.
    pub(super) fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                // SAFETY: features checked on the line above.
                && unsafe { agrees_with_libm() }
        })
    }

    /// The check: `exp`, `gelu` and `gelu_grad` against their scalar libm forms on every
    /// 4099th f32 bit pattern (about a million inputs: all magnitudes, both signs, the specials).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn agrees_with_libm() -> bool {
        let x: Vec<f32> = (0..=u32::MAX)
            .step_by(4099)
            .map(f32::from_bits)
            .chain([f32::NEG_INFINITY, f32::INFINITY, 0.0, -0.0, 88.0, -88.0])
            .collect();
        let n = x.len() / 8 * 8;
        let (x, g) = (&x[..n], &x[..n]);
        let c = super::gelu_c() as f32;
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        let mut y = x.to_vec();
        exp(&mut y);
        if !x.iter().zip(&y).all(|(a, b)| same(a.exp(), *b)) {
            return false;
        }
        gelu(x, super::as_out(&mut y), c);
        if !x.iter().zip(&y).all(|(&a, b)| same(gelu1(a, c), *b)) {
            return false;
        }
        // Gradients at moderate inputs (a large g times a tiny slope is an underflow either way).
        let xs: Vec<f32> = x.iter().map(|v| v.clamp(-20.0, 20.0)).collect();
        gelu_grad(&xs, g, super::as_out(&mut y), c);
        xs.iter()
            .zip(g)
            .zip(&y)
            .all(|((&a, &g), b)| same(gelu_grad1(a, g, c), *b))
    }

    /// glibc `__expf_fma`'s main path on four doubles (inputs converted from f32, |x| < 88).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp4(xd: __m256d) -> __m256d {
        let inv = _mm256_set1_pd(f64::from_bits(INV_LN2_N));
        let shift = _mm256_set1_pd(f64::from_bits(SHIFT));
        // k = round(x·32/ln 2), r = x·32/ln 2 − k (one rounding each, as glibc's FMAs).
        let kd = _mm256_fmadd_pd(inv, xd, shift);
        let ki = _mm256_castpd_si256(kd);
        let kd = _mm256_sub_pd(kd, shift);
        let r = _mm256_fmsub_pd(inv, xd, kd);
        // s = 2^(k/32): the table entry plus k in the exponent bits.
        let i = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
        // SAFETY: every index is in 0..32.
        let t = unsafe { _mm256_i64gather_epi64::<8>(TAB.as_ptr() as *const i64, i) };
        let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
        let z = _mm256_fmadd_pd(
            _mm256_set1_pd(f64::from_bits(C0)),
            r,
            _mm256_set1_pd(f64::from_bits(C1)),
        );
        let r2 = _mm256_mul_pd(r, r);
        let y = _mm256_fmadd_pd(_mm256_set1_pd(f64::from_bits(C2)), r, _mm256_set1_pd(1.0));
        _mm256_mul_pd(_mm256_fmadd_pd(z, r2, y), s)
    }

    /// `expf` of eight lanes. `−∞` gives 0; other lanes outside glibc's main path (|x| ≥ 88, NaN)
    /// are handed to libm.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let lo = exp4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        let hi = exp4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
        let y = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
        let bits = _mm256_castps_si256(x);
        let abs = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fff_ffff));
        let outside = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x42af_ffff));
        let neg_inf = _mm256_cmpeq_epi32(bits, _mm256_set1_epi32(0xff80_0000u32 as i32));
        let y = _mm256_andnot_ps(_mm256_castsi256_ps(neg_inf), y);
        let rest = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(neg_inf, outside)));
        if rest == 0 {
            return y;
        }
        let (mut xs, mut ys) = ([0f32; 8], [0f32; 8]);
        // SAFETY: both arrays hold eight f32.
        unsafe {
            _mm256_storeu_ps(xs.as_mut_ptr(), x);
            _mm256_storeu_ps(ys.as_mut_ptr(), y);
        }
        for (i, (y, x)) in ys.iter_mut().zip(xs).enumerate() {
            if rest >> i & 1 == 1 {
                *y = x.exp();
            }
        }
        // SAFETY: as above.
        unsafe { _mm256_loadu_ps(ys.as_ptr()) }
    }

    /// Flex's sigmoid: `1 / (1 + exp(−v))` for `v ≥ 0`, else `e / (1 + e)` with `e = exp(v)`;
    /// both exponents are `−|v|`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sigmoid8(v: __m256) -> __m256 {
        let e = exp8(_mm256_or_ps(v, _mm256_set1_ps(-0.0)));
        let one = _mm256_set1_ps(1.0);
        let den = _mm256_add_ps(one, e);
        // One division: the numerator is 1 where v ≥ 0, e elsewhere.
        let ge = _mm256_cmp_ps::<_CMP_GE_OQ>(v, _mm256_setzero_ps());
        _mm256_div_ps(_mm256_blendv_ps(e, one, ge), den)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gate8(x: __m256, c: __m256) -> __m256 {
        let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
        let u2 = _mm256_add_ps(x, _mm256_mul_ps(x3, _mm256_set1_ps(A)));
        sigmoid8(_mm256_mul_ps(u2, c))
    }

    /// AVX2 and FMA ([`enabled`]) and AVX-512 F and DQ.
    pub(super) fn v4_enabled() -> bool {
        enabled() && v4::enabled()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp(x: &mut [f32]) {
        if v4::enabled() {
            // SAFETY: `enabled` checked AVX-512 F and DQ.
            return unsafe { v4::exp(x) };
        }
        let mut it = x.chunks_exact_mut(8);
        for v in &mut it {
            // SAFETY: eight f32 in and out.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), exp8(_mm256_loadu_ps(v.as_ptr()))) };
        }
        it.into_remainder().iter_mut().for_each(|v| *v = v.exp());
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gelu(x: &[f32], out: &mut [MaybeUninit<f32>], c: f32) {
        if v4::enabled() {
            // SAFETY: `enabled` checked AVX-512 F and DQ.
            return unsafe { v4::gelu(x, out, c) };
        }
        let cv = _mm256_set1_ps(c);
        let n = x.len() / 8 * 8;
        for (o, x) in out[..n].chunks_exact_mut(8).zip(x[..n].chunks_exact(8)) {
            // SAFETY: eight f32 in and out.
            unsafe {
                let x = _mm256_loadu_ps(x.as_ptr());
                _mm256_storeu_ps(o.as_mut_ptr() as *mut f32, _mm256_mul_ps(x, gate8(x, cv)));
            }
        }
        for (o, &x) in out[n..].iter_mut().zip(&x[n..]) {
            o.write(gelu1(x, c));
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gelu_grad(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>], c: f32) {
        if v4::enabled() {
            // SAFETY: as in `gelu`.
            return unsafe { v4::gelu_grad(x, g, out, c) };
        }
        let cv = _mm256_set1_ps(c);
        let one = _mm256_set1_ps(1.0);
        let n = x.len() / 8 * 8;
        let chunks = out[..n]
            .chunks_exact_mut(8)
            .zip(x[..n].chunks_exact(8).zip(g[..n].chunks_exact(8)));
        for (o, (x, g)) in chunks {
            // SAFETY: eight f32 in and out.
            unsafe {
                let x = _mm256_loadu_ps(x.as_ptr());
                let g = _mm256_loadu_ps(g.as_ptr());
                let s = gate8(x, cv);
                let xx = _mm256_mul_ps(x, x);
                let slope = _mm256_mul_ps(
                    _mm256_add_ps(_mm256_mul_ps(xx, _mm256_set1_ps(A3)), one),
                    cv,
                );
                let ds = _mm256_sub_ps(s, _mm256_mul_ps(s, s));
                let d = _mm256_add_ps(s, _mm256_mul_ps(_mm256_mul_ps(x, ds), slope));
                _mm256_storeu_ps(o.as_mut_ptr() as *mut f32, _mm256_mul_ps(g, d));
            }
        }
        for ((o, &x), &g) in out[n..].iter_mut().zip(&x[n..]).zip(&g[n..]) {
            o.write(gelu_grad1(x, g, c));
        }
    }

    /// The GELU kernels sixteen lanes at a time with AVX-512 (the same operations, so the same
    /// values: `exp` as eight doubles per instruction instead of four).
    mod v4 {
        use super::{A, A3, C0, C1, C2, INV_LN2_N, SHIFT, TAB, gelu_grad1, gelu1};
        use std::arch::x86_64::*;
        use std::mem::MaybeUninit;
        use std::sync::OnceLock;

        /// AVX-512 F and DQ present.
        pub(super) fn enabled() -> bool {
            static ON: OnceLock<bool> = OnceLock::new();
            *ON.get_or_init(|| {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq")
            })
        }

        /// [`super::exp4`] on eight doubles.
        #[inline]
        #[target_feature(enable = "avx512f,avx512dq")]
        fn exp8d(xd: __m512d) -> __m512d {
            let inv = _mm512_set1_pd(f64::from_bits(INV_LN2_N));
            let shift = _mm512_set1_pd(f64::from_bits(SHIFT));
            let kd = _mm512_fmadd_pd(inv, xd, shift);
            let ki = _mm512_castpd_si512(kd);
            let kd = _mm512_sub_pd(kd, shift);
            let r = _mm512_fmsub_pd(inv, xd, kd);
            let i = _mm512_and_si512(ki, _mm512_set1_epi64(31));
            // SAFETY: every index is in 0..32.
            let t = unsafe { _mm512_i64gather_epi64::<8>(i, TAB.as_ptr() as *const i64) };
            let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
            let z = _mm512_fmadd_pd(
                _mm512_set1_pd(f64::from_bits(C0)),
                r,
                _mm512_set1_pd(f64::from_bits(C1)),
            );
            let r2 = _mm512_mul_pd(r, r);
            let y = _mm512_fmadd_pd(_mm512_set1_pd(f64::from_bits(C2)), r, _mm512_set1_pd(1.0));
            _mm512_mul_pd(_mm512_fmadd_pd(z, r2, y), s)
        }

        /// [`super::exp8`] on sixteen lanes, for inputs ≤ 0 (GELU's sigmoid): `−∞` gives 0,
        /// lanes below glibc's main path (x < −88, NaN) are handed to libm.
        #[inline]
        #[target_feature(enable = "avx512f,avx512dq")]
        fn exp16(x: __m512) -> __m512 {
            let lo = exp8d(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
            let hi = exp8d(_mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(x)));
            let y = _mm512_insertf32x8::<1>(
                _mm512_castps256_ps512(_mm512_cvtpd_ps(lo)),
                _mm512_cvtpd_ps(hi),
            );
            let bits = _mm512_castps_si512(x);
            let abs = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
            let outside = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x42af_ffff));
            let neg_inf = _mm512_cmpeq_epi32_mask(bits, _mm512_set1_epi32(0xff80_0000u32 as i32));
            let y = _mm512_maskz_mov_ps(!neg_inf, y);
            let rest = outside & !neg_inf;
            if rest == 0 {
                return y;
            }
            let (mut xs, mut ys) = ([0f32; 16], [0f32; 16]);
            // SAFETY: both arrays hold sixteen f32.
            unsafe {
                _mm512_storeu_ps(xs.as_mut_ptr(), x);
                _mm512_storeu_ps(ys.as_mut_ptr(), y);
            }
            for (i, (y, x)) in ys.iter_mut().zip(xs).enumerate() {
                if rest >> i & 1 == 1 {
                    *y = x.exp();
                }
            }
            // SAFETY: as above.
            unsafe { _mm512_loadu_ps(ys.as_ptr()) }
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512dq")]
        fn gate16(x: __m512, c: __m512) -> __m512 {
            let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            let v = _mm512_mul_ps(_mm512_add_ps(x, _mm512_mul_ps(x3, _mm512_set1_ps(A))), c);
            // Flex's sigmoid, as `sigmoid8`: one division, numerator 1 where v ≥ 0, e elsewhere.
            let e = exp16(_mm512_or_ps(v, _mm512_set1_ps(-0.0)));
            let one = _mm512_set1_ps(1.0);
            let den = _mm512_add_ps(one, e);
            let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, _mm512_setzero_ps());
            _mm512_div_ps(_mm512_mask_blend_ps(ge, e, one), den)
        }

        #[target_feature(enable = "avx512f,avx512dq")]
        pub(super) fn exp(x: &mut [f32]) {
            let mut it = x.chunks_exact_mut(16);
            for v in &mut it {
                // SAFETY: sixteen f32 in and out.
                unsafe { _mm512_storeu_ps(v.as_mut_ptr(), exp16(_mm512_loadu_ps(v.as_ptr()))) };
            }
            it.into_remainder().iter_mut().for_each(|v| *v = v.exp());
        }

        #[target_feature(enable = "avx512f,avx512dq")]
        pub(super) fn gelu(x: &[f32], out: &mut [MaybeUninit<f32>], c: f32) {
            let cv = _mm512_set1_ps(c);
            let n = x.len() / 16 * 16;
            for (o, x) in out[..n].chunks_exact_mut(16).zip(x[..n].chunks_exact(16)) {
                // SAFETY: sixteen f32 in and out.
                unsafe {
                    let x = _mm512_loadu_ps(x.as_ptr());
                    _mm512_storeu_ps(o.as_mut_ptr() as *mut f32, _mm512_mul_ps(x, gate16(x, cv)));
                }
            }
            for (o, &x) in out[n..].iter_mut().zip(&x[n..]) {
                o.write(gelu1(x, c));
            }
        }

        #[target_feature(enable = "avx512f,avx512dq")]
        pub(super) fn gelu_grad(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>], c: f32) {
            let cv = _mm512_set1_ps(c);
            let one = _mm512_set1_ps(1.0);
            let n = x.len() / 16 * 16;
            let chunks = out[..n]
                .chunks_exact_mut(16)
                .zip(x[..n].chunks_exact(16).zip(g[..n].chunks_exact(16)));
            for (o, (x, g)) in chunks {
                // SAFETY: sixteen f32 in and out.
                unsafe {
                    let x = _mm512_loadu_ps(x.as_ptr());
                    let g = _mm512_loadu_ps(g.as_ptr());
                    let s = gate16(x, cv);
                    let xx = _mm512_mul_ps(x, x);
                    let slope = _mm512_mul_ps(
                        _mm512_add_ps(_mm512_mul_ps(xx, _mm512_set1_ps(A3)), one),
                        cv,
                    );
                    let ds = _mm512_sub_ps(s, _mm512_mul_ps(s, s));
                    let d = _mm512_add_ps(s, _mm512_mul_ps(_mm512_mul_ps(x, ds), slope));
                    _mm512_storeu_ps(o.as_mut_ptr() as *mut f32, _mm512_mul_ps(g, d));
                }
            }
            for ((o, &x), &g) in out[n..].iter_mut().zip(&x[n..]).zip(&g[n..]) {
                o.write(gelu_grad1(x, g, c));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 257th f32 bit pattern, plus the specials.
    fn sweep() -> Vec<f32> {
        (0..=u32::MAX)
            .step_by(257)
            .map(f32::from_bits)
            .chain([f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 0.0, -0.0])
            .collect()
    }

    fn same(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!(
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                "{x:e} vs {y:e}"
            );
        }
    }

    #[test]
    fn exp_is_libm_expf_bit_for_bit() {
        let x = sweep();
        let mut y = x.clone();
        exp(&mut y);
        same(&y, &x.iter().map(|v| v.exp()).collect::<Vec<_>>());
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert!(
                simd::enabled(),
                "the vector expf disagrees with this libm's expf"
            );
        }
    }

    /// All 2³² inputs (about 30 s on two cores): `cargo test --release -p lora-gpt -- --ignored`.
    #[test]
    #[ignore]
    fn exp_is_libm_expf_on_every_f32() {
        (0..4096u32).into_par_iter().for_each(|block| {
            let x: Vec<f32> = (0..1 << 20)
                .map(|i| f32::from_bits(block << 20 | i))
                .collect();
            let mut y = x.clone();
            exp(&mut y);
            same(&y, &x.iter().map(|v| v.exp()).collect::<Vec<_>>());
        });
    }

    #[test]
    fn gelu_kernels_are_the_scalar_forms_bit_for_bit() {
        let c = gelu_c() as f32;
        let x: Vec<f32> = sweep().into_iter().map(|v| v.clamp(-30.0, 30.0)).collect();
        let g: Vec<f32> = x.iter().rev().copied().collect();
        let mut y = vec![0.0; x.len()];
        gelu(&x, as_out(&mut y));
        same(&y, &x.iter().map(|&v| gelu1(v, c)).collect::<Vec<_>>());
        gelu_grad(&x, &g, as_out(&mut y));
        let want: Vec<f32> = x
            .iter()
            .zip(&g)
            .map(|(&v, &g)| gelu_grad1(v, g, c))
            .collect();
        same(&y, &want);
    }
}
