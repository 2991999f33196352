//! The Q8_0 kernel (`crates/kernels`): the AVX-512 VNNI and AVX2 paths equal their portable
//! statement bit for bit, for every row count and two stacked matrices, and the portable arithmetic is candle's
//! Q8_0 matmul up to f32 summation order. (The model-level proof, against llama.cpp's logits, is
//! `model::logits_match_llama_cpp`: the default model runs on this kernel.)

use candle_core::{
    quantized::{GgmlDType, QMatMul, QTensor},
    Device, Module, Tensor,
};
use tagllm_kernels::{Isa, PackedQ8};

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
    assert_close_to_candle(&ours, w, x, m);
    assert!(ours.iter().any(|v| v.abs() > 1.0));
}

/// `ours` is candle's Q8_0 matmul of `x` (`[m, k]`) by `w` up to f32 rounding of the sums.
fn assert_close_to_candle(ours: &[f32], w: QTensor, x: Vec<f32>, m: usize) {
    let k = x.len() / m;
    let theirs: Vec<f32> = QMatMul::from_qtensor(w)
        .unwrap()
        .forward(&Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn simd_kernels_equal_the_portable_arithmetic_bit_for_bit() {
    let isas: Vec<Isa> = [Isa::Avx512Vnni, Isa::Avx2]
        .into_iter()
        .filter(|i| i.supported())
        .collect();
    if isas.is_empty() {
        eprintln!("skipped: this CPU has neither AVX-512 VNNI nor AVX2");
        return;
    }
    // Two matrices stacked (as q/k/v are), tile rows not a multiple of 4, every row count
    // from 1 to 19 (the 8-row kernel, its remainders, and the 4-tile decode kernel).
    let (k, parts) = (160, [q8(64, 160, 3), q8(32, 160, 4)]);
    let packed = PackedQ8::pack(&[&parts[0], &parts[1]]).unwrap().unwrap();
    assert_eq!(packed.n(), 96);
    let bits = |v: Vec<f32>| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for &isa in &isas {
        assert!(packed.runs_on(isa));
        for m in 1..20 {
            let x = random(m * k, 10 + m as u64);
            let simd = packed.matmul_with(&x, m, isa);
            let portable = packed.matmul_portable(&x, m);
            assert_eq!(bits(simd.clone()), bits(portable), "{isa:?}, m = {m}");
            // A row's output does not depend on the other rows.
            let alone = packed.matmul_with(&x[..k], 1, isa);
            assert_eq!(alone, simd[..96], "{isa:?}, m = {m}");
        }
        // Rounding ties and near-ties in the input's quantization: with a block's largest value
        // at 127, `x / d` is `x`, so 2.5 must become 3 and -0.5 become -1 (half away from zero),
        // as ggml's `roundf` does (round-to-nearest-even, the SIMD default, would give 2 and -0).
        let ties = [127.0, 2.5, -2.5, 0.5, -0.5, 1.499_999_9, -126.5, 0.0];
        let x: Vec<f32> = (0..k).map(|i| ties[i % ties.len()]).collect();
        assert_eq!(
            bits(packed.matmul_with(&x, 1, isa)),
            bits(packed.matmul_portable(&x, 1)),
            "{isa:?}"
        );
    }
}

/// A Q8_0 weight of -128 (which ggml's and candle's quantizers never write, but a file may hold)
/// has no magnitude for AVX2's sign trick: such a matrix is not run on AVX2, and the portable
/// arithmetic still takes it.
#[test]
fn a_minus_128_weight_keeps_a_matrix_off_the_avx2_kernel() {
    let (n, k) = (16, 64);
    let mut raw = Vec::new();
    for r in 0..n {
        for b in 0..k / QK {
            raw.extend_from_slice(&[0x00, 0x3c]); // d = 1.0 as f16
            raw.extend((0..QK).map(|i| ((r * 7 + b * 3 + i) % 255) as u8 ^ 0x80));
        }
    }
    let w = candle_core::quantized::ggml_file::qtensor_from_ggml(
        GgmlDType::Q8_0,
        &raw,
        vec![n, k],
        &Device::Cpu,
    )
    .unwrap();
    assert!(raw.contains(&0x80), "a -128 weight is present");
    let packed = PackedQ8::pack(&[&w]).unwrap().unwrap();
    assert!(!packed.runs_on(Isa::Avx2));
    // The portable arithmetic still takes it: candle's, as in the first test.
    let x = random(3 * k, 9);
    let ours = packed.matmul_portable(&x, 3);
    assert_close_to_candle(&ours, w, x, 3);
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

/// The decode attention kernel (AVX-512 and portable) against the same attention written in
/// candle ops (scores matmul, softmax, values matmul): grouped heads, three sequences of a step
/// with 1, 9 and 37 cached positions in caches with room to spare, and the query row of each at
/// a different place in the step. Equal up to f32 summation order and the polynomial `exp`
/// (2e-6 relative on values of order 1; measured 1.0e-6).
#[test]
fn decode_attention_matches_candle_ops() {
    use tagllm_kernels::{decode_attention_with, DecodeRow};
    let (heads, kv_heads, hd, cap, rows) = (6, 2, 64, 48, 5);
    let rep = heads / kv_heads;
    let scale = (hd as f32).powf(-0.5);
    let q = random(heads * rows * hd, 31);
    let caches: Vec<(Vec<f32>, Vec<f32>, usize, usize)> = [(1, 0), (9, 2), (37, 4)]
        .iter()
        .enumerate()
        .map(|(i, &(n, at))| {
            let mut k = random(kv_heads * cap * hd, 40 + i as u64);
            k.iter_mut().for_each(|x| *x *= 3.0); // wider scores, a peakier softmax
            (k, random(kv_heads * cap * hd, 50 + i as u64), n, at)
        })
        .collect();
    let decode: Vec<DecodeRow<'_>> = caches
        .iter()
        .map(|(k, v, n, at)| DecodeRow {
            at: *at,
            k,
            v,
            cap,
            n: *n,
        })
        .collect();
    let dev = &Device::Cpu;
    let qt = Tensor::from_vec(q.clone(), (heads, rows, hd), dev).unwrap();
    let mut worst = 0f32;
    for simd in [true, false] {
        let ours = decode_attention_with(&q, rows, &decode, (heads, kv_heads, hd), scale, simd);
        for (r, (k, v, n, at)) in caches.iter().enumerate() {
            let keys = Tensor::from_vec(k.clone(), (kv_heads, cap, hd), dev)
                .unwrap()
                .narrow(1, 0, *n)
                .unwrap();
            let vals = Tensor::from_vec(v.clone(), (kv_heads, cap, hd), dev)
                .unwrap()
                .narrow(1, 0, *n)
                .unwrap();
            let qs = qt
                .narrow(1, *at, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((kv_heads, rep, hd))
                .unwrap();
            let scores = (qs.matmul(&keys.t().unwrap()).unwrap() * scale as f64).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let theirs: Vec<f32> = probs
                .matmul(&vals.contiguous().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let row = &ours[r * heads * hd..][..heads * hd];
            for (a, b) in row.iter().zip(&theirs) {
                let rel = (a - b).abs() / b.abs().max(1.0);
                worst = worst.max(rel);
                assert!(rel <= 2e-6, "simd {simd}, row {r}: {a} vs {b}");
            }
        }
    }
    eprintln!("decode attention: worst relative difference {worst:e}");
}

/// The prefill attention kernel against the same attention in candle ops (scores matmul, causal
/// mask, softmax, values matmul): grouped heads (3 and 2 per key/value head, so tasks of 6 and 8
/// rows), a sequence in the middle of a step's rows, prefills from an empty cache and after
/// cached positions, lengths that leave partial blocks of 16 keys. Equal up to f32 summation
/// order and the polynomial `exp`: 1e-5 relative on values of order 1 (measured 4.1e-6, in the
/// case whose head size, 32, puts `random`'s x40 blocks in whole query and key rows, so scores
/// reach the hundreds and their f32 rounding, ~1e-5, moves the probabilities by as much).
#[test]
fn prefill_attention_matches_candle_ops() {
    use tagllm_kernels::{prefill_attention, prefill_attention_available};
    if !prefill_attention_available(64) {
        eprintln!("skipped: this CPU has no AVX-512 VNNI");
        return;
    }
    let dev = &Device::Cpu;
    let mut worst = 0f32;
    for (heads, kv_heads, hd, past, len) in [(6, 2, 64, 0, 7), (6, 2, 64, 21, 13), (8, 4, 32, 5, 9)]
    {
        let (alloc, rows, at) = (48, len + 4, 3);
        let rep = heads / kv_heads;
        let scale = (hd as f32).powf(-0.5);
        let q = random(heads * rows * hd, 61 + past as u64);
        let mut k = random(kv_heads * alloc * hd, 62);
        k.iter_mut().for_each(|x| *x *= 3.0);
        let v = random(kv_heads * alloc * hd, 63);
        let ours = prefill_attention(
            &q,
            rows,
            (at, len, past),
            &k,
            &v,
            alloc,
            (heads, kv_heads, hd),
            scale,
        );

        let n = past + len;
        let keys = Tensor::from_vec(k, (kv_heads, alloc, hd), dev)
            .unwrap()
            .narrow(1, 0, n)
            .unwrap();
        let vals = Tensor::from_vec(v, (kv_heads, alloc, hd), dev)
            .unwrap()
            .narrow(1, 0, n)
            .unwrap();
        let qs = Tensor::from_vec(q, (heads, rows, hd), dev)
            .unwrap()
            .narrow(1, at, len)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((kv_heads, rep * len, hd))
            .unwrap();
        let mut mask = vec![0f32; rep * len * n];
        for (r, row) in mask.chunks_exact_mut(n).enumerate() {
            row[past + r % len + 1..].fill(f32::NEG_INFINITY);
        }
        let mask = Tensor::from_vec(mask, (rep * len, n), dev).unwrap();
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
            let rel = (a - b).abs() / b.abs().max(1.0);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-5,
                "heads {heads}/{kv_heads}, past {past}, len {len}: {a} vs {b}"
            );
        }
    }
    eprintln!("prefill attention: worst relative difference {worst:e}");
}
