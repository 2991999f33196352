//! tagllm's CPU kernels: Q8_0 matrix products for x86 CPUs with AVX-512 VNNI or AVX2 (the default
//! model's projections), and attention for decode steps ([`decode_attention`]) and prefills
//! ([`prefill_attention`], AVX-512).
//!
//! candle 0.11.1 multiplies Q8_0 weights one 32-value block and one output row at a time
//! (`vec_dot`), and its repacked VNNI kernels need the inner dimension to be a multiple of 256,
//! which SmolLM2's hidden size (576) is not. Here the weights are repacked at load into tiles of
//! 16 output rows by one 32-value block, each weight stored `+ 128` as an unsigned byte, so one
//! `vpdpbusd` multiplies 4 inputs into all 16 rows at once; each input row is quantized to Q8_0
//! exactly as ggml does it (per 32 values, `d = amax / 127`, `d` rounded to f16), and the
//! `+ 128` comes off again through the block's sum of input quants. Projections that read the
//! same input (q, k and v; gate and up) are packed into one matrix, so the input is quantized
//! once and the thread pool is woken once for them.
//!
//! Every output value is one lane's `Σ_blocks fma(dot_block as f32, d_w · d_x, acc)` in block
//! order, whatever the number of input rows or how the work is split across threads, so a row's
//! result does not depend on what it is batched with. A portable implementation of the same
//! arithmetic ([`PackedQ8::matmul_portable`]) is the reference the SIMD kernels are tested
//! against, bit for bit. On AVX2 without AVX-512 VNNI the same tiles run on an AVX2 kernel
//! ([`Isa::Avx2`]: `vpmaddubsw` on the weights' magnitudes with the signs moved onto the
//! inputs, as ggml does on AVX2); the integer dot products are the same, so the results are too.
//! Other CPUs (and every GPU) keep candle's `QMatMul`. `TAGLLM_KERNELS=avx2` or `off` chooses a
//! lesser path at start ([`isa`]).
//!
//! This is a crate of its own so that debug builds (the test suite) compile it optimized: the
//! root crate builds at opt-level 0 in tests, where these intrinsics would be slower than candle.
//!
//! Layout: `q8` holds [`PackedQ8`] (packing, dispatch, the portable statement, the inputs'
//! quantization) with its kernels in `q8::avx512` and `q8::avx2`; `op` the candle `CustomOp1`
//! and [`Projections`]; `attention` [`decode_attention`] and [`prefill_attention`] with their
//! AVX-512 code in `attention::avx512`. Instruction-set selection ([`Isa`], [`isa`]) is here.

#![warn(missing_docs)]

mod attention;
mod op;
mod q8;

pub use attention::{
    decode_attention, decode_attention_with, prefill_attention, prefill_attention_available,
    DecodeRow,
};
pub use op::Projections;
pub use q8::PackedQ8;

/// The instruction set a [`PackedQ8`] product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW/VNNI: one `vpdpbusd` per 4 inputs of 16 rows.
    Avx512Vnni,
    /// AVX2 and FMA: `vpmaddubsw` on the weights' magnitudes with the signs moved onto the
    /// inputs, then `vpmaddwd`, per 4 inputs of 8 rows (what ggml does on AVX2).
    Avx2,
}

impl Isa {
    /// Whether this CPU has it.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Isa::Avx2 => has!("avx2") && has!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }
}

/// `TAGLLM_KERNELS` as set at start (read once): `avx2` or `off` ask for less than the best.
fn asked() -> &'static str {
    static ASKED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ASKED.get_or_init(|| {
        std::env::var("TAGLLM_KERNELS")
            .unwrap_or_default()
            .trim()
            .to_string()
    })
}

/// The instruction set packed products run on: the best this CPU has, unless the environment
/// variable `TAGLLM_KERNELS` asks for `avx2` (on a CPU that has it: what an AVX2-only CPU runs,
/// AVX-512 attention included off) or `off` (candle's matmuls, no AVX-512 attention); `None`
/// where neither kernel runs.
pub fn isa() -> Option<Isa> {
    static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| match asked() {
        "off" => None,
        "avx2" => Some(Isa::Avx2).filter(|i| i.supported()),
        _ => [Isa::Avx512Vnni, Isa::Avx2]
            .into_iter()
            .find(|i| i.supported()),
    })
}

/// Whether packed products run on this CPU ([`isa`]).
pub fn available() -> bool {
    isa().is_some()
}

/// Whether the attention kernels run on AVX-512: the CPU has it and `TAGLLM_KERNELS` does not
/// ask for less (checked once).
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && !matches!(asked(), "avx2" | "off")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
