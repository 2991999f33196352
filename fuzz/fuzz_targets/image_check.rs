//! Image decoding at the edge: any bytes as an inline image. Nothing may panic or allocate past
//! the limits (libFuzzer's -rss_limit_mb catches the latter).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tagllm::domain::Limits;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_image_pixels: 1 << 20,
        max_image_side: 4096,
        ..Limits::default()
    };
    if let Ok(info) = tagllm::tagging::images::check("f", data, &limits) {
        assert!(u64::from(info.width) * u64::from(info.height) <= limits.max_image_pixels);
    }
});
