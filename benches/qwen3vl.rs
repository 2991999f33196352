//! CPU prefill and decode speed of our Qwen3-VL on a checkpoint directory, the same measure
//! `scripts/bench_qwen3vl_hf.py` takes of Hugging Face transformers; `scripts/bench_qwen3vl.sh`
//! runs both in one go on a Qwen3-VL-2B-width checkpoint with random weights and prints the ratio.
//! Given a GGUF file instead (`--model models/smollm2/*.gguf`), the same measure of our batched
//! llama decoder (weights re-quantized to Q8_0 as the server does); it writes its prompt ids to
//! `target/bench/gguf-prompts.json` for `scripts/bench_llamacpp.py` (`scripts/bench_gguf.sh`
//! runs both).
//!
//!     cargo bench --bench qwen3vl -- --model DIR|GGUF [--prompt-tokens 290] [--new-tokens 64]
//!         [--runs 6] [--image PATH] [--dtype f32|bf16] [--batch N]
//!
//! Prints one JSON line: median, min and max of prefill and decode tokens/s over the runs (one
//! warm-up run first). Prompt ids are drawn from the tokenizer's ordinary tokens with a fixed
//! seed; with `--image`, the prompt is the image's tokens between vision markers, then the text.

use std::time::Instant;

use tagllm::model::{qwen3vl::image_proc, LoadOptions, PromptInput, Requantize, TextModel};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().ok().expect("bad flag value"))
        .unwrap_or(default)
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    serde_json::json!({"median": median, "min": v[0], "max": v[v.len() - 1], "runs": v})
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--model") {
        eprintln!(
            "usage: cargo bench --bench qwen3vl -- --model DIR (see scripts/bench_qwen3vl.sh)"
        );
        return;
    }
    let dir: std::path::PathBuf = arg(&args, "--model", String::new()).into();
    let prompt_tokens: usize = arg(&args, "--prompt-tokens", 290);
    let new_tokens: usize = arg(&args, "--new-tokens", 64);
    let runs: usize = arg(&args, "--runs", 6);
    let batch: usize = arg(&args, "--batch", 1);
    let image: String = arg(&args, "--image", String::new());
    let dtype = match arg(&args, "--dtype", "f32".to_string()).as_str() {
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        _ => candle_core::DType::F32,
    };
    if dir.is_file() {
        return gguf(&dir, prompt_tokens, new_tokens, runs, batch);
    }
    let mut opts = LoadOptions::cpu(Requantize::None);
    opts.dtype = Some(dtype);
    opts.context_tokens = prompt_tokens + new_tokens + 2048;
    opts.image_max_pixels = 448 * 448;
    let t0 = Instant::now();
    let model = TextModel::load_with(&dir, &opts).expect("load");
    let load_s = t0.elapsed().as_secs_f64();
    let vl = model.qwen3vl().expect("a Qwen3-VL checkpoint");
    // Ordinary tokens only (ids below the special tokens), fixed seed.
    let vocab = model.tokenizer().get_vocab_size(false) as u64;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab.min(vl.config.image_token_id as u64)) as u32
    };
    let mut ids: Vec<u32> = Vec::new();
    let mut images = Vec::new();
    if !image.is_empty() {
        let bytes = std::fs::read(&image).expect("image");
        let rgb = image_proc::decode_rgb(&bytes, image::Limits::default()).expect("decode");
        images.push(
            image_proc::preprocess(&rgb, model.info.image_processor.as_ref().unwrap()).unwrap(),
        );
        ids.extend([
            vl.config.vision_start_token_id,
            vl.config.image_token_id,
            vl.config.vision_end_token_id,
        ]);
    }
    // --prompt-tokens counts the image's tokens too, as the transformers script does.
    let image_tokens: usize = images
        .iter()
        .map(|p| p.llm_tokens(vl.config.vision.spatial_merge_size))
        .sum();
    let placeholders = images.len();
    while ids.len() + image_tokens < prompt_tokens + placeholders {
        ids.push(next());
    }
    let prepared = vl.prepare(&ids, &images).expect("prepare");
    // --batch N: N copies of the prompt prefilled in one packed step and decoded together, each
    // with its own cache (what the engine does with N concurrent notes); tokens/s are aggregate.
    let mut caches: Vec<_> = (0..batch)
        .map(|_| vl.new_cache(opts.context_tokens).unwrap())
        .collect();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for run in 0..=runs {
        caches.iter_mut().for_each(|c| c.reset());
        let prompts: Vec<_> = (0..batch).map(|_| &prepared).collect();
        let t = Instant::now();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let logits = vl.prefill(&prompts, &mut refs, false).unwrap();
        let mut toks: Vec<u32> = logits
            .iter()
            .map(|l| tagllm::model::argmax(&l.to_vec1::<f32>().unwrap()))
            .collect();
        let tp = t.elapsed().as_secs_f64();
        let deltas = vec![prepared.rope_delta; batch];
        let t = Instant::now();
        for _ in 0..new_tokens {
            let mut refs: Vec<_> = caches.iter_mut().collect();
            let out = vl.decode(&toks, &deltas, &mut refs).unwrap();
            toks = out
                .iter()
                .map(|l| tagllm::model::argmax(&l.to_vec1::<f32>().unwrap()))
                .collect();
        }
        let td = t.elapsed().as_secs_f64();
        if run > 0 {
            prefill.push((batch * prepared.tokens.len()) as f64 / tp);
            decode.push((batch * new_tokens) as f64 / td);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "tagllm",
            "model": dir.display().to_string(),
            "dtype": format!("{dtype:?}"),
            "threads": candle_core::utils::get_num_threads(),
            "prompt_tokens": prepared.tokens.len(),
            "batch": batch,
            "new_tokens": new_tokens,
            "load_s": load_s,
            "prefill_tok_s": stats(prefill),
            "decode_tok_s": stats(decode),
        })
    );
}

/// `--batch` copies of a random prompt through the llama decoder's slots: one packed prefill,
/// then `new_tokens` packed decode steps.
fn gguf(
    path: &std::path::Path,
    prompt_tokens: usize,
    new_tokens: usize,
    runs: usize,
    batch: usize,
) {
    let opts = LoadOptions {
        max_batch: batch,
        prefix_cache: 0,
        adapter: None,
        context_tokens: prompt_tokens + new_tokens + 16,
        ..LoadOptions::cpu(Requantize::Q8_0)
    };
    let mut model = TextModel::load_with(path, &opts).expect("load");
    let vocab = model.tokenizer().get_vocab_size(false) as u64;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let ids: Vec<u32> = (0..prompt_tokens)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (100 + state % (vocab - 100)) as u32
        })
        .collect();
    // The same prompt for the llama.cpp peer (scripts/bench_llamacpp.py), once per timed run.
    let peer: Vec<_> = (0..runs)
        .map(|r| serde_json::json!({"note_id": format!("random-{prompt_tokens}-{r}"), "prompt_ids": ids}))
        .collect();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("gguf-prompts.json"),
        serde_json::json!({"max_new_tokens": new_tokens, "prompts": peer}).to_string(),
    )
    .unwrap();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        let inputs: Vec<_> = (0..batch)
            .map(|slot| PromptInput {
                ids: &ids,
                images: &[],
                slot,
                shared_prefix: 0,
            })
            .collect();
        let t = Instant::now();
        let out = model.prefill_batch(&inputs).unwrap();
        let tp = t.elapsed().as_secs_f64();
        let mut toks: Vec<u32> = out
            .iter()
            .map(|p| tagllm::model::argmax(&p.logits))
            .collect();
        let t = Instant::now();
        for _ in 0..new_tokens {
            let steps: Vec<(u32, usize)> = toks.iter().copied().zip(0..batch).collect();
            toks = model
                .decode_batch(&steps)
                .unwrap()
                .iter()
                .map(|l| tagllm::model::argmax(l))
                .collect();
        }
        let td = t.elapsed().as_secs_f64();
        if run > 0 {
            prefill.push((batch * prompt_tokens) as f64 / tp);
            decode.push((batch * new_tokens) as f64 / td);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "tagllm",
            "model": path.display().to_string(),
            "threads": candle_core::utils::get_num_threads(),
            "prompt_tokens": prompt_tokens,
            "batch": batch,
            "new_tokens": new_tokens,
            "prefill_tok_s": stats(prefill),
            "decode_tok_s": stats(decode),
        })
    );
}
