//! The Q8_0 kernel alone, on the default model's shapes (SmolLM2-135M: hidden 576, MLP 1536, q/k/v
//! stacked 960, gate/up stacked 3072, vocabulary 49152), one input row (decode) and 64 (prefill).
//! Weights stay in cache between repetitions here, unlike in the model. Run:
//!   cargo run --release -p tagllm-kernels --example speed
use candle_core::{
    quantized::{GgmlDType, QTensor},
    Device, Tensor,
};
use std::time::Instant;
fn main() {
    for &(n, k, m) in &[
        (576usize, 576usize, 1usize),
        (960, 576, 1),
        (3072, 576, 1),
        (576, 1536, 1),
        (49152, 576, 1),
        (960, 576, 64),
        (3072, 576, 64),
        (576, 1536, 64),
    ] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let p = tagllm_kernels::PackedQ8::pack(&[&q]).unwrap().unwrap();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let reps = (2_000_000_000 / (n * k * m)).max(3);
        let _ = p.matmul(&x, m);
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(p.matmul(&x, m));
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "n {n} k {k} m {m}: {:.1} us, {:.1} GMAC/s, {:.1} GB/s weights",
            s * 1e6,
            (n * k * m) as f64 / s / 1e9,
            (n * k) as f64 * 1.125 / s / 1e9
        );
    }
}
