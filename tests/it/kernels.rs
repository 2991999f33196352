//! The Q8_0 kernel (`crates/kernels`): the AVX-512 VNNI path equals its portable statement bit
//! for bit, for every row count and two stacked matrices, and the portable arithmetic is candle's
//! Q8_0 matmul up to f32 summation order. (The model-level proof, against llama.cpp's logits, is
//! `model::logits_match_llama_cpp`: the default model runs on this kernel.)

use candle_core::{
    quantized::{GgmlDType, QMatMul, QTensor},
    Device, Module, Tensor,
};
use tagllm_kernels::{available, PackedQ8};

const QK: usize = 32;
fn random(len: usize, seed: u64) -> Vec<f32> {
    // xorshift: reproducible values in (-1, 1), some blocks scaled up, one all zero.
    let mut s = seed;
    (0..len)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s % 20_001) as f32 / 10_000.0 - 1.0;
            match (i / QK) % 7 {
                3 => v * 40.0,
                5 => 0.0,
                _ => v,
            }
        })
        .collect()
}

fn q8(n: usize, k: usize, seed: u64) -> QTensor {
    let w = Tensor::from_vec(random(n * k, seed), (n, k), &Device::Cpu).unwrap();
    QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()
}

#[test]
fn portable_arithmetic_matches_candles_q8_0_matmul() {
    // candle's own Q8_0 path quantizes the input the same way and sums in another order:
    // equal up to f32 rounding of sums of ~k products.
    let (n, k, m) = (48, 96, 5);
    let w = q8(n, k, 1);
    let packed = PackedQ8::pack(&[&w]).unwrap().unwrap();
    let x = random(m * k, 2);
    let ours = packed.matmul_portable(&x, m);
    let xt = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
    let theirs: Vec<f32> = QMatMul::from_qtensor(w)
        .unwrap()
        .forward(&xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
    assert!(ours.iter().any(|v| v.abs() > 1.0));
}

#[test]
fn simd_kernel_equals_the_portable_arithmetic_bit_for_bit() {
    if !available() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI");
        return;
    }
    // Two matrices stacked (as q/k/v are), tile rows not a multiple of 4, every row count
    // from 1 to 19 (the 8-row kernel, its remainders, and the 4-tile decode kernel).
    let (k, parts) = (160, [q8(64, 160, 3), q8(32, 160, 4)]);
    let packed = PackedQ8::pack(&[&parts[0], &parts[1]]).unwrap().unwrap();
    assert_eq!(packed.n(), 96);
    for m in 1..20 {
        let x = random(m * k, 10 + m as u64);
        let simd = packed.matmul(&x, m);
        let portable = packed.matmul_portable(&x, m);
        assert_eq!(
            simd.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "m = {m}"
        );
        // A row's output does not depend on the other rows.
        let alone = packed.matmul(&x[..k], 1);
        assert_eq!(alone, simd[..96], "m = {m}");
    }
    // Rounding ties and near-ties in the input's quantization: with a block's largest value at
    // 127, `x / d` is `x`, so 2.5 must become 3 and -0.5 become -1 (half away from zero), as
    // ggml's `roundf` does (round-to-nearest-even, the SIMD default, would give 2 and -0).
    let ties = [127.0, 2.5, -2.5, 0.5, -0.5, 1.499_999_9, -126.5, 0.0];
    let x: Vec<f32> = (0..k).map(|i| ties[i % ties.len()]).collect();
    let bits = |v: Vec<f32>| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(packed.matmul(&x, 1)),
        bits(packed.matmul_portable(&x, 1))
    );
}

#[test]
fn unfit_layouts_are_not_packed() {
    let w = q8(40, 64, 5); // 40 rows: not a multiple of 16
    assert!(PackedQ8::pack(&[&w]).unwrap().is_none());
    let a = q8(16, 64, 6);
    let b = q8(16, 96, 7); // another k
    assert!(PackedQ8::pack(&[&a, &b]).unwrap().is_none());
    let f = QTensor::quantize(
        &Tensor::zeros((16, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::Q4_1,
    )
    .unwrap();
    assert!(PackedQ8::pack(&[&f]).unwrap().is_none());
}

/// The direct attention kernel against the same attention written in candle ops (scores matmul,
/// causal mask, softmax, values matmul): grouped heads, a cache with room to spare, a prefill of
/// several rows after earlier positions, and a single decode row. Equal up to f32 summation
/// order (1e-5 relative on values of order 1).
#[test]
fn causal_attention_matches_candle_ops() {
    use tagllm_kernels::CausalAttention;
    let (heads, kv_heads, hd, cap) = (6, 2, 32, 40);
    let rep = heads / kv_heads;
    for (past, len) in [(0, 7), (9, 5), (20, 1)] {
        let q = random(heads * len * hd, 21 + past as u64);
        let k = random(kv_heads * cap * hd, 22);
        let v = random(kv_heads * cap * hd, 23);
        let scale = (hd as f32).powf(-0.5);
        let ours =
            CausalAttention { past, scale }.compute(&q, &k, &v, heads, kv_heads, len, cap, hd);

        let dev = &Device::Cpu;
        let keys = Tensor::from_vec(k, (kv_heads, cap, hd), dev).unwrap();
        let vals = Tensor::from_vec(v, (kv_heads, cap, hd), dev).unwrap();
        let (keys, vals) = (
            keys.narrow(1, 0, past + len).unwrap(),
            vals.narrow(1, 0, past + len).unwrap(),
        );
        let qs = Tensor::from_vec(q, (kv_heads, rep * len, hd), dev).unwrap();
        let mut mask = vec![0f32; rep * len * (past + len)];
        for (r, row) in mask.chunks_exact_mut(past + len).enumerate() {
            row[past + r % len + 1..].fill(f32::NEG_INFINITY);
        }
        let mask = Tensor::from_vec(mask, (rep * len, past + len), dev).unwrap();
        let scores = (qs.matmul(&keys.t().unwrap()).unwrap() * scale as f64)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let theirs: Vec<f32> = probs
            .matmul(&vals.contiguous().unwrap())
            .unwrap()
            .reshape((heads, len, hd))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "past {past} len {len}: {a} vs {b}"
            );
        }
    }
}
