//! The image processor's pieces against their references: the resize against torch's uint8
//! bicubic antialias kernel (`tests/fixtures/qwen3vl/imgproc/resize_torch.json`, written by
//! `scripts/gen_resize_refs.py`: per case the sizes, the seed and pattern of a generated input
//! image, and the FNV-1a hash of torch's output), and `smart_resize` against transformers' own
//! Python function (`smart_resize.json`, written by `scripts/gen_smart_resize_refs.py`: random
//! sizes, exact .5 ties, aspect ratios around 200, several factors and pixel budgets). HF's
//! torchvision backend hands torch a contiguous NCHW uint8 tensor, which on x86 with AVX2 runs
//! `upsample_avx_bilinear_bicubic_uint8`; the references were made on such a CPU.

use image::RgbImage;
use tagllm::model::qwen3vl::image_proc::{resize_bicubic_antialias, smart_resize, ImageProcError};

/// The splitmix64 output for index `i` (1-based) of stream `seed`.
fn splitmix(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator's image: 0 = uniform noise, 1 = black/white noise, 2 = ramp plus noise.
fn make_image(h: u32, w: u32, seed: u64, mode: u32) -> RgbImage {
    let n = (h * w * 3) as usize;
    let bytes = (0..n)
        .map(|idx| {
            let z = splitmix(seed, idx as u64 + 1);
            match mode {
                0 => (z >> 56) as u8,
                1 => {
                    if z >> 63 == 1 {
                        255
                    } else {
                        0
                    }
                }
                _ => {
                    let c = idx % 3;
                    let x = (idx / 3) % w as usize;
                    let y = idx / (3 * w as usize);
                    ((x * 3 + y * 5 + c * 71 + (z >> 62) as usize) & 255) as u8
                }
            }
        })
        .collect();
    RgbImage::from_raw(w, h, bytes).unwrap()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn resize_matches_torch_bit_for_bit() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/qwen3vl/imgproc/resize_torch.json"
    ))
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() > 3000, "reference has {} cases", cases.len());
    let mut failures = Vec::new();
    let mut width_one = 0;
    for case in cases {
        let v = case.as_array().unwrap();
        let n = |i: usize| v[i].as_u64().unwrap();
        let (ih, iw, oh, ow, seed, mode) = (n(0), n(1), n(2), n(3), n(4), n(5));
        let want = v[6].as_str().unwrap();
        let img = make_image(ih as u32, iw as u32, seed, mode as u32);
        let out = resize_bicubic_antialias(&img, ow as u32, oh as u32);
        assert_eq!(out.dimensions(), (ow as u32, oh as u32));
        let got = format!("{:016x}", fnv1a(out.as_raw()));
        if got != want {
            failures.push(format!("{ih}x{iw} -> {oh}x{ow} (seed {seed}, mode {mode})"));
        }
        width_one += usize::from(ow == 1);
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from torch: {:?}",
        failures.len(),
        cases.len(),
        &failures[..failures.len().min(20)]
    );
    eprintln!(
        "{} resize cases bit-exact with torch ({width_one} with output width 1)",
        cases.len()
    );
}

#[test]
fn matches_transformers() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/qwen3vl/imgproc/smart_resize.json"
    ))
    .unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let (mut ok, mut aspect, mut zero) = (0, 0, 0);
    for c in &cases {
        let n = |i: usize| c[i].as_u64().unwrap() as usize;
        let (h, w, f, lo, hi) = (n(0), n(1), n(2), n(3), n(4));
        let got = smart_resize(h, w, f, lo, hi);
        match &c[5] {
            serde_json::Value::String(s) if s == "aspect" => {
                assert!(
                    matches!(got, Err(ImageProcError::AspectRatio { .. })),
                    "{c}: {got:?}"
                );
                aspect += 1;
            }
            serde_json::Value::Array(v) => {
                let want = (
                    v[0].as_u64().unwrap() as usize,
                    v[1].as_u64().unwrap() as usize,
                );
                if want.0 == 0 || want.1 == 0 {
                    // HF returns a zero side here (min_pixels = 0) and fails later in torch.
                    assert!(
                        matches!(got, Err(ImageProcError::ZeroSize { .. })),
                        "{c}: {got:?}"
                    );
                    zero += 1;
                } else {
                    assert_eq!(got.unwrap(), want, "{c}");
                    ok += 1;
                }
            }
            other => panic!("unexpected reference {other}"),
        }
    }
    eprintln!("smart_resize: {ok} sizes equal, {aspect} aspect errors, {zero} zero-side errors");
    assert!(ok > 4000);
}

#[test]
fn ties_round_to_even() {
    // 48 / 32 = 1.5 -> 2 blocks, 80 / 32 = 2.5 -> 2 blocks, 112 / 32 = 3.5 -> 4 blocks.
    assert_eq!(smart_resize(48, 80, 32, 0, 1 << 30).unwrap(), (64, 64));
    assert_eq!(smart_resize(112, 80, 32, 0, 1 << 30).unwrap(), (128, 64));
}

#[test]
fn aspect_ratio_limit_is_200() {
    assert!(smart_resize(1, 200, 32, 4096, 65536).is_ok());
    let err = smart_resize(2, 401, 32, 4096, 65536).unwrap_err();
    assert!(err.to_string().contains("the limit is 200"), "{err}");
    assert!(matches!(
        smart_resize(0, 5, 32, 4096, 65536),
        Err(ImageProcError::EmptyImage { .. })
    ));
}
