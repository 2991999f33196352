"""Helpers shared by the scripts that run Hugging Face transformers' Qwen3-VL: the fixture generator
(gen_qwen3vl_fixtures.py), the real-shape random checkpoint writer (qwen3vl_shapes.py), the
benchmarks (bench_qwen3vl_hf.py, bench_gpu_hf.py) and the half-precision drift check
(hf_bf16_drift.py). Not a script: they import it as a sibling module (`python scripts/NAME.py`
puts scripts/ on sys.path).

What it holds: the fixture paths; the Qwen3-VL config builders (text_config / vision_config add
the settings every Qwen3-VL here shares to a shape's sizes; qwen3vl_config takes the image / video
/ vision start / end ids from the tokenizer) and the real Qwen3-VL-2B / -4B shapes (SHAPES);
Qwen3-VL's real image processor pixel bounds (REAL_IMAGE_SIZE); the fixtures' image decoding rule
(load_image); the processor outputs the model takes (MODEL_INPUTS, model_inputs); and greedy
generation with EOS really off (greedy_config, generate_with).

Importing it sets HF_HUB_OFFLINE=1 and TOKENIZERS_PARALLELISM=false (unless already set) before
transformers loads, so the scripts import it before transformers; one that needs more environment
(the fixture generator's single threads) sets it before importing this.
"""

import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from PIL import Image, ImageOps  # noqa: E402
from transformers import GenerationConfig, Qwen3VLConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "qwen3vl"
TINY = FIXTURE / "model"

# Qwen3-VL's real image processor bounds (min / max pixels).
REAL_IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}

# The processor outputs Qwen3VLForConditionalGeneration takes.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def text_config(mrope_section: list[int], **sizes) -> dict:
    """A Qwen3-VL text_config: `sizes` plus what every Qwen3-VL here shares (silu, RMSNorm eps 1e-6,
    no attention bias, rope_theta 5e6, interleaved M-RoPE over `mrope_section`), in the
    transformers 5 layout (rope_parameters)."""
    return dict(
        sizes,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        attention_bias=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": list(mrope_section),
            "mrope_interleaved": True,
        },
    )


def vision_config(**sizes) -> dict:
    """A Qwen3-VL vision_config: `sizes` plus what every Qwen3-VL vision tower shares (RGB input,
    patch 16, temporal patch 2, spatial merge 2, gelu_pytorch_tanh)."""
    return dict(
        sizes,
        in_channels=3,
        patch_size=16,
        temporal_patch_size=2,
        spatial_merge_size=2,
        hidden_act="gelu_pytorch_tanh",
    )


# The real checkpoints' shapes (Qwen/Qwen3-VL-2B-Instruct's and -4B-Instruct's config.json; see
# scripts/qwen3vl_shapes.py).
_TEXT_COMMON = dict(
    mrope_section=[24, 20, 20],
    vocab_size=151936,
    head_dim=128,
    num_key_value_heads=8,
    max_position_embeddings=262144,
    tie_word_embeddings=True,
)
_VISION_COMMON = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, num_position_embeddings=2304)
SHAPES = {
    "2b": dict(
        text=text_config(**_TEXT_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
        vision=vision_config(**_VISION_COMMON, deepstack_visual_indexes=[5, 11, 17], out_hidden_size=2048),
    ),
    "4b": dict(
        text=text_config(**_TEXT_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
        vision=vision_config(**_VISION_COMMON, deepstack_visual_indexes=[5, 11, 17], out_hidden_size=2560),
    ),
}


def qwen3vl_config(tok, text: dict, vision: dict, tie_word_embeddings: bool) -> Qwen3VLConfig:
    """The Qwen3VLConfig of these text / vision configs (copied, not kept), with the image, video,
    vision start and vision end token ids taken from the tokenizer `tok`."""
    ids = tok.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config=copy.deepcopy(text),
        vision_config=copy.deepcopy(vision),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tie_word_embeddings,
    )


def load_image(path) -> Image.Image:
    """The fixtures' decoding rule: PIL open, EXIF transpose, the PIL image to the processor."""
    with Image.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im)


def model_inputs(enc) -> dict:
    """The processor outputs (MODEL_INPUTS) that `enc` has."""
    return {k: enc[k] for k in MODEL_INPUTS if k in enc}


def greedy_config(new_tokens: int, pad_id: int, **overrides) -> GenerationConfig:
    """Pure greedy decoding (argmax, one beam, KV cache, no repetition penalty) with EOS disabled,
    so exactly `new_tokens` come out (min_new_tokens too, unless `overrides` say otherwise)."""
    settings = dict(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=pad_id,
        bos_token_id=None,
        num_beams=1,
        use_cache=True,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=None,
    )
    settings.update(overrides)
    return GenerationConfig(**settings)


def generate_with(model, inputs: dict, gc: GenerationConfig, **kwargs):
    """model.generate(**inputs, generation_config=gc, **kwargs), with `gc` also standing as the
    model's own generation config during the call: generate() fills fields left None (eos_token_id
    among them) from model.generation_config, so EOS is only really off while that has none. The
    model's M-RoPE deltas, cached by a previous call, are reset before and after."""
    saved = model.generation_config
    model.generation_config = copy.deepcopy(gc)
    model.model.rope_deltas = None
    try:
        return model.generate(**inputs, generation_config=gc, **kwargs)
    finally:
        model.generation_config = saved
        model.model.rope_deltas = None
