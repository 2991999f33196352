//! The Q8_0 kernel alone, on the default model's shapes (SmolLM2-135M: hidden 576, MLP 1536, q/k/v
//! stacked 960, gate/up stacked 3072, vocabulary 49152), one input row (decode) and 64 (prefill),
//! on every instruction set this CPU has, next to candle's `QMatMul` on the same matrix (its
//! Q8_0 kernel, chosen at run time, on candle's thread pool). Weights stay in cache between
//! repetitions here, unlike in the model. Run:
//!   cargo run --release -p tagllm-kernels --example speed
use candle_core::{
    quantized::{GgmlDType, QMatMul, QTensor},
    Device, Module, Tensor,
};
use std::time::Instant;
use tagllm_kernels::Isa;

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let isas: Vec<Isa> = [Isa::Avx512Vnni, Isa::Avx2]
        .into_iter()
        .filter(|i| i.supported())
        .collect();
    println!("| n x k, input rows | candle QMatMul | {} |", {
        let names: Vec<String> = isas.iter().map(|i| format!("{i:?}")).collect();
        names.join(" | ")
    });
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
        let gmacs = |s: f64| (n * k * m) as f64 / s / 1e9;
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let candle = QMatMul::from_qtensor(q).unwrap();
        let c = time(reps.div_ceil(4), || {
            std::hint::black_box(candle.forward(&xt).unwrap());
        });
        let mut row = format!(
            "| {n} x {k}, {m} | {:.1} us ({:.1} GMAC/s) |",
            c * 1e6,
            gmacs(c)
        );
        for &isa in &isas {
            let s = time(reps, || {
                std::hint::black_box(p.matmul_with(&x, m, isa));
            });
            row += &format!(
                " {:.1} us ({:.1} GMAC/s, {:.1}x) |",
                s * 1e6,
                gmacs(s),
                c / s
            );
        }
        println!("{row}");
    }
}
