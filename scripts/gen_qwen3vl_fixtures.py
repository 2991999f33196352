"""Writes the Qwen3-VL parity fixtures (tests/fixtures/qwen3vl/): a tiny random Qwen3-VL checkpoint,
synthetic test images and Hugging Face transformers' reference outputs for them.

Run from the repository root (CI does not need it; it uses the committed files):

    python3 -m venv /work/venvs/hf
    /work/venvs/hf/bin/pip install -r scripts/qwen3vl-requirements.txt
    /work/venvs/hf/bin/python scripts/gen_qwen3vl_fixtures.py            # [OUT_DIR]

Nothing is downloaded: the model, tokenizer, processor and images are all built locally from config
objects, a tokenizer trained here and synthetic pixels. Deterministic: fixed seeds, one torch thread
and one tokenizers thread; with the pinned versions two runs write byte-identical files (checked).
The tokenizer is trained on repository text (tests/fixtures/eval_notes.jsonl, models/handbook.toml,
models/HANDBOOK.md) plus the sentences below, so editing those files changes the tokenizer; their
sha256 are recorded in reference.json.

What it writes (OUT_DIR defaults to tests/fixtures/qwen3vl):

model/  hub layout, written by save_pretrained of Qwen3VLForConditionalGeneration and Qwen3VLProcessor:
    config.json, generation_config.json, model.safetensors (F32), tokenizer.json,
    tokenizer_config.json, chat_template.jinja and processor_config.json (what transformers 5
    writes; image and video processor settings are nested in processor_config.json), plus
    preprocessor_config.json and video_preprocessor_config.json written by this script in the
    layout hub checkpoints carry. The references are computed with the processor and the model
    reloaded from these files, so the files alone reproduce them.
  - text: hidden 64, intermediate 128, 3 layers, 4 heads, 2 KV heads, head_dim 16, untied lm_head,
    M-RoPE mrope_section [2, 3, 3] interleaved, rope_theta 5e6, rms_norm_eps 1e-6.
  - vision: depth 3, hidden 32, 2 heads, intermediate 64, patch 16, temporal patch 2, merge 2,
    out_hidden 64, 64 learned position embeddings (8x8 grid, bilinearly interpolated),
    deepstack_visual_indexes [0, 1], gelu_pytorch_tanh.
  - weights re-initialised at O(1) scale with a fixed seed (matrices normal(0, 1/sqrt(fan_in)),
    embeddings normal(0, 1), norm weights 1 + 0.1 normal, biases 0.1 normal) so greedy argmax is a
    real test; the seed is the first of 0, 1, 2, ... whose smallest top-1/top-2 logit margin over all
    greedy steps is >= MIN_MARGIN (reported in reference.json).
  - tokenizer: byte-level BPE (986 merges-vocab + 14 special tokens = 1000) trained with `tokenizers`,
    Qwen2 pre-tokenizer (Qwen2 split regex + ByteLevel(add_prefix_space=False, use_regex=False)),
    NFC normalizer, ByteLevel decoder; the 14 Qwen3-VL special tokens are appended in the real
    order (<|endoftext|> ... <|video_pad|>); eos <|im_end|>, pad <|endoftext|>.
  - chat template: the Qwen3-VL-Instruct template, verbatim (CHAT_TEMPLATE below: checked byte for
    byte against a public copy labelled as Qwen/Qwen3-VL-8B-Instruct's template; a second,
    independent public copy reads the same). Saved as chat_template.jinja.
  - image processor: Qwen3-VL's settings (patch 16, temporal 2, merge 2, mean = std = 0.5, bicubic,
    default torchvision backend) but with small pixel bounds: size = {shortest_edge: 4096,
    longest_edge: 65536} (min/max pixels), so the fixtures stay small.

images/  synthetic, written with Pillow from a fixed seed (gradients + shapes + noise):
    a.png  RGB 100x75 (resized to 96x64)         b.jpg RGB JPEG 64x64 q90 (no resize)
    c.png  RGBA 77x51, varying alpha              d.jpg grayscale JPEG 90x130
    e.png  RGB 400x300 (over max_pixels: shrunk;  f.jpg RGB JPEG 60x90 stored, EXIF orientation 6
           noise only in its left 120 columns, to keep the PNG small)
  Decoding rule used for every reference: open with PIL, apply ImageOps.exif_transpose, pass the PIL
  image object to the processor, which converts it with transformers' convert_to_rgb (alpha
  composited over white, grayscale expanded to RGB). (HF decodes a *path* differently: it drops alpha.)

reference.safetensors + reference.json:
  per image NAME:  decoded.NAME u8 [H, W, 3] (exactly what the resize sees), pixel_values.NAME
                   F32 [n_patches, 1536] (over 100k values: only the SHA-256 of its little-endian
                   bytes, in reference.json "pixel_values_sha256"), grid_thw.NAME I64 [1, 3]
                   (image processor, that image alone)
  per prompt P in P1 (system + 2 images + text), P2 (text only), P3 (1 RGBA image + text):
                   input_ids.P I64 [seq], image_grid_thw.P (when images; the pixel values are
                   the per-image ones, concatenated),
                   position_ids.P I64 [3, seq] (HF's get_rope_index; rope delta in reference.json),
                   logits.P F32 [seq, vocab] (prefill, eager attention, F32),
                   greedy.P I64 [16] (16 greedy tokens; EOS disabled so exactly 16 come out)
  left-padded batch [P1, P2]: batch.input_ids / batch.attention_mask I64 [2, L],
                   batch.position_ids I64 [3, 2, L], batch.last_logits F32 [2, vocab],
                   batch.greedy I64 [2, 16]
"""

import hashlib
import json
import os
import sys
from pathlib import Path

# Single threads, before torch and tokenizers load; qwen3vl_common sets HF_HUB_OFFLINE and
# TOKENIZERS_PARALLELISM=false.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from qwen3vl_common import (  # noqa: E402
    FIXTURE,
    REPO,
    generate_with,
    greedy_config,
    load_image,
    model_inputs,
    qwen3vl_config,
    text_config,
    vision_config,
)

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    GenerationConfig,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)
from transformers.image_transforms import convert_to_rgb  # noqa: E402

NEW_TOKENS = 16
MIN_MARGIN = 2e-2
IMAGE_SEED = 20240611
BPE_VOCAB = 986  # + 14 special tokens = 1000

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-VL-Instruct's chat template, verbatim.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
CHAT_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"

EXTRA_SENTENCES = [
    "You tag notes.",
    "Tag this note: best ramen in Osaka",
    "Title: 周末露营 Body: tent by the lake, coffee at dawn",
    "what is this?",
    "The quick brown fox jumps over the lazy dog.",
    "A photo of a cat sitting on a red sofa next to a window.",
    "Describe the image in one sentence, then list three tags.",
    "We hiked up the mountain at sunrise and had noodles at the top.",
    "My new running shoes are light, but the sole wears out quickly on concrete.",
    "This lipstick shade looks great in daylight and lasts about four hours.",
    "Weekend camping by the lake: tent, stove, two chairs and a lot of coffee.",
    "今天天气很好，我们去公园散步，顺便拍了很多照片。",
    "周末露营，湖边搭帐篷，清晨煮咖啡。",
    "这家拉面店在大阪很有名，汤头浓郁，排队的人很多。",
    "猫咪今天吃了半罐罐头，精神很好。",
    "请为这条笔记打上标签。",
    "图片里有一只狗在草地上奔跑。",
    "价格有点贵，但是质量不错，推荐购买。",
]

MODEL_SHAPE = dict(
    text=text_config(
        [2, 3, 3],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    ),
    vision=vision_config(
        depth=3,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        out_hidden_size=64,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    ),
)

PROCESSOR_SETTINGS = dict(
    size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64},
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    do_resize=True,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    do_convert_rgb=True,
    resample=3,  # PIL bicubic
)


VIDEO_SETTINGS = dict(
    size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64},
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Images


def _base(rng: np.random.Generator, w: int, h: int, phase: float, noisy_cols: int | None = None) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin((x + 2 * y) / (0.15 * (w + h)) + phase)
    arr = np.stack([r, g, b], axis=-1)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.1, h * 0.15, w * 0.55, h * 0.7], fill=(250, 40, 30))
    d.rectangle([w * 0.5, h * 0.45, w * 0.92, h * 0.9], fill=(20, 30, 200))
    d.line([0, h - 1, w - 1, 0], fill=(255, 255, 255), width=max(1, w // 25))
    d.polygon([(w * 0.7, h * 0.05), (w * 0.95, h * 0.35), (w * 0.6, h * 0.3)], fill=(10, 200, 60))
    arr = np.asarray(img).astype(np.float64)
    noise = rng.normal(0.0, 12.0, size=arr.shape)
    if noisy_cols is not None:
        noise[:, noisy_cols:, :] = 0.0
    arr += noise
    # a checkerboard corner: high frequencies for the resampler
    cs = max(2, min(w, h) // 16)
    cb = ((np.arange(h)[:, None] // 2 + np.arange(w)[None, :] // 2) % 2) * 255.0
    arr[:cs * 4, :cs * 4, :] = cb[:cs * 4, :cs * 4, None]
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def write_images(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(IMAGE_SEED)
    info = {}

    a = _base(rng, 100, 75, 0.0)
    Image.fromarray(a).save(out / "a.png", optimize=False, compress_level=9)
    info["a.png"] = "RGB PNG 100x75: resized to 96x64"

    b = _base(rng, 64, 64, 1.0)
    Image.fromarray(b).save(out / "b.jpg", quality=90)
    info["b.jpg"] = "RGB JPEG 64x64 quality 90: no resize"

    c = _base(rng, 77, 51, 2.0)
    y, x = np.mgrid[0:51, 0:77]
    alpha = 255.0 * (x / 76.0) * (0.5 + 0.5 * np.cos(y / 8.0))
    alpha[:10, :] = 0  # fully transparent stripe
    alpha[-8:, :] = 255  # fully opaque stripe
    alpha = np.clip(np.rint(alpha + rng.normal(0, 6, size=alpha.shape)), 0, 255).astype(np.uint8)
    rgba = np.concatenate([c, alpha[..., None]], axis=-1)
    Image.fromarray(rgba).save(out / "c.png", optimize=False, compress_level=9)
    info["c.png"] = "RGBA PNG 77x51, varying alpha (composited over white)"

    d = _base(rng, 90, 130, 3.0)
    gray = Image.fromarray(d).convert("L")
    gray.save(out / "d.jpg", quality=90)
    info["d.jpg"] = "grayscale JPEG 90x130"

    e = _base(rng, 400, 300, 4.0, noisy_cols=120)
    Image.fromarray(e).save(out / "e.png", optimize=False, compress_level=9)
    info["e.png"] = "RGB PNG 400x300: over max_pixels, downscaled"

    f = _base(rng, 60, 90, 5.0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(f).save(out / "f.jpg", quality=90, exif=exif.tobytes())
    info["f.jpg"] = "RGB JPEG stored 60x90 with EXIF orientation 6 (displayed 90x60)"
    return info


# ----------------------------------------------------------------------------------------------
# Tokenizer


def corpus_lines() -> tuple[list[str], dict]:
    lines = []
    sources = {}
    notes = REPO / "tests" / "fixtures" / "eval_notes.jsonl"
    sources[str(notes.relative_to(REPO))] = sha256(notes)
    for line in notes.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            for key in ("title", "body", "category"):
                if isinstance(rec.get(key), str) and rec[key]:
                    lines.append(rec[key])
    for rel in ("models/handbook.toml", "models/HANDBOOK.md"):
        p = REPO / rel
        sources[rel] = sha256(p)
        lines.extend(x for x in p.read_text(encoding="utf-8").splitlines() if x.strip())
    lines.extend(EXTRA_SENTENCES * 4)
    return lines, sources


def build_tokenizer() -> tuple[Qwen2Tokenizer, dict]:
    tok = Tokenizer(
        BPE(
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines, sources = corpus_lines()
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() == BPE_VOCAB, tok.get_vocab_size()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Serialise the way Qwen2's tokenizer.json does (the ByteLevel decoder ignores these flags, and
    # this tokenizers version's Python constructor does not take them).
    j = json.loads(tok.to_str())
    j["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    j["model"]["continuing_subword_prefix"] = ""
    j["model"]["end_of_word_suffix"] = ""
    tok = Tokenizer.from_str(json.dumps(j))
    assert tok.token_to_id(SPECIAL_TOKENS[0]) == BPE_VOCAB
    hf_tok = Qwen2Tokenizer(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=262144,
        errors="replace",
        split_special_tokens=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    for i, t in enumerate(SPECIAL_TOKENS):
        assert hf_tok.convert_tokens_to_ids(t) == BPE_VOCAB + i, t
    assert len(hf_tok) == BPE_VOCAB + len(SPECIAL_TOKENS), len(hf_tok)
    return hf_tok, sources


# ----------------------------------------------------------------------------------------------
# Model


def make_config(tok: Qwen2Tokenizer) -> Qwen3VLConfig:
    text = dict(MODEL_SHAPE["text"], vocab_size=len(tok), pad_token_id=None)
    cfg = qwen3vl_config(tok, text, MODEL_SHAPE["vision"], tie_word_embeddings=False)
    cfg.dtype = "float32"
    return cfg


def reinit_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                assert "norm" in name, name
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight") or name.endswith("pos_embed.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


def build_model(cfg: Qwen3VLConfig, seed: int) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    reinit_(model, seed)
    model.eval()
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    return model


# ----------------------------------------------------------------------------------------------
# References


def messages_for(name: str) -> list:
    if name == "P1":
        return [
            {"role": "system", "content": "You tag notes."},
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": "Title: 周末露营 Body: tent by the lake, coffee at dawn"},
                ],
            },
        ]
    if name == "P2":
        return [{"role": "user", "content": "Tag this note: best ramen in Osaka"}]
    if name == "P3":
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
    raise KeyError(name)


PROMPT_IMAGES = {"P1": ["a.png", "b.jpg"], "P2": [], "P3": ["c.png"]}


def greedy_manual(model, inputs: dict, n: int) -> tuple[torch.Tensor, list]:
    """Pure argmax over full re-forwards (no KV cache): the definition of the greedy reference."""
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"]
    mm = inputs["mm_token_type_ids"]
    extra = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    out = []
    margins = []
    for _ in range(n):
        model.model.rope_deltas = None
        logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, **extra).logits[:, -1, :]
        top2 = torch.topk(logits, 2, dim=-1).values
        margins.extend((top2[:, 0] - top2[:, 1]).tolist())
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        mm = torch.cat([mm, torch.zeros_like(nxt, dtype=mm.dtype)], dim=1)
    model.model.rope_deltas = None
    return torch.cat(out, dim=1), margins


def greedy_generate(model, inputs: dict, n: int, pad_id: int) -> tuple[torch.Tensor, list]:
    gc = greedy_config(n, pad_id, min_new_tokens=0, output_logits=True, return_dict_in_generate=True)
    res = generate_with(model, inputs, gc)
    new = res.sequences[:, inputs["input_ids"].shape[1]:]
    margins = []
    for step_logits in res.logits:
        top2 = torch.topk(step_logits.float(), 2, dim=-1).values
        margins.extend((top2[:, 0] - top2[:, 1]).tolist())
    return new, margins


def run_references(model, processor, images, pad_id: int) -> tuple[dict, dict, float]:
    tensors = {}
    meta = {"prompts": {}}
    all_margins = []
    for name in ("P1", "P2", "P3"):
        msgs = messages_for(name)
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        imgs = [images[n] for n in PROMPT_IMAGES[name]]
        enc = processor(text=[text], images=imgs or None, return_tensors="pt")
        inputs = model_inputs(enc)
        ids = inputs["input_ids"]
        tensors[f"input_ids.{name}"] = ids[0].clone()
        if imgs:
            tensors[f"pixel_values.{name}"] = inputs["pixel_values"].float().clone()
            tensors[f"image_grid_thw.{name}"] = inputs["image_grid_thw"].long().clone()
        model.model.rope_deltas = None
        pos, delta = model.model.get_rope_index(
            ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"],
        )
        tensors[f"position_ids.{name}"] = pos[:, 0, :].long().clone()
        with torch.no_grad():
            model.model.rope_deltas = None
            logits = model(**inputs).logits[0].float()
            model.model.rope_deltas = None
            tensors[f"logits.{name}"] = logits.clone()
            gen, m_gen = greedy_generate(model, inputs, NEW_TOKENS, pad_id)
            man, m_man = greedy_manual(model, inputs, NEW_TOKENS)
        assert torch.equal(gen, man), (name, gen, man)
        assert gen.shape == (1, NEW_TOKENS)
        assert int(logits[-1].argmax()) == int(gen[0, 0])
        tensors[f"greedy.{name}"] = gen[0].clone()
        all_margins += m_gen + m_man
        meta["prompts"][name] = {
            "messages": msgs,
            "images": PROMPT_IMAGES[name],
            "text": text,
            "seq_len": int(ids.shape[1]),
            "rope_delta": int(delta.reshape(-1)[0]),
            "image_grid_thw": inputs["image_grid_thw"].tolist() if imgs else [],
            "greedy_text": processor.tokenizer.decode(gen[0], skip_special_tokens=False),
            "min_greedy_margin": float(min(m_gen + m_man)),
        }

    # Left-padded batch [P1, P2]
    texts = [meta["prompts"][n]["text"] for n in ("P1", "P2")]
    imgs = [images[n] for n in PROMPT_IMAGES["P1"] + PROMPT_IMAGES["P2"]]
    enc = processor(text=texts, images=imgs, padding=True, padding_side="left", return_tensors="pt")
    inputs = model_inputs(enc)
    assert int(inputs["attention_mask"][:, 0].min()) == 0, "expected left padding"
    tensors["batch.input_ids"] = inputs["input_ids"].clone()
    tensors["batch.attention_mask"] = inputs["attention_mask"].long().clone()
    model.model.rope_deltas = None
    pos, delta = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    tensors["batch.position_ids"] = pos.long().clone()
    with torch.no_grad():
        model.model.rope_deltas = None
        logits = model(**inputs).logits[:, -1, :].float()
        model.model.rope_deltas = None
        tensors["batch.last_logits"] = logits.clone()
        gen, m_gen = greedy_generate(model, inputs, NEW_TOKENS, pad_id)
        man, m_man = greedy_manual(model, inputs, NEW_TOKENS)
    assert torch.equal(gen, man), ("batch", gen, man)
    assert torch.equal(logits.argmax(-1), gen[:, 0])
    tensors["batch.greedy"] = gen.clone()
    all_margins += m_gen + m_man
    # The padded batch must agree with the single prompts (same greedy tokens).
    for row, name in enumerate(("P1", "P2")):
        assert torch.equal(gen[row], tensors[f"greedy.{name}"]), name
    diffs = [
        float((logits[row] - tensors[f"logits.{name}"][-1]).abs().max()) for row, name in enumerate(("P1", "P2"))
    ]
    meta["batch"] = {
        "prompts": ["P1", "P2"],
        "padding_side": "left",
        "seq_len": int(inputs["input_ids"].shape[1]),
        "rope_deltas": delta.reshape(-1).tolist(),
        "max_abs_last_logits_diff_vs_single": max(diffs),
        "min_greedy_margin": float(min(m_gen + m_man)),
    }
    return tensors, meta, float(min(all_margins))


def image_references(processor, images, img_dir: Path) -> tuple[dict, dict]:
    tensors = {}
    info = {}
    ip = processor.image_processor
    for name, im in images.items():
        key = name.split(".")[0]
        decoded = convert_to_rgb(im, return_numpy=True)
        assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] == 3
        out = ip(images=[im], return_tensors="pt")
        tensors[f"decoded.{key}"] = torch.from_numpy(np.ascontiguousarray(decoded))
        tensors[f"pixel_values.{key}"] = out["pixel_values"].float().clone()
        tensors[f"grid_thw.{key}"] = out["image_grid_thw"].long().clone()
        t, gh, gw = out["image_grid_thw"][0].tolist()
        with Image.open(img_dir / name) as f:
            file_mode, file_size = f.mode, f.size
        info[key] = {
            "file": name,
            "mode_in_file": file_mode,
            "size_in_file_wh": list(file_size),
            "decoded_wh": [int(decoded.shape[1]), int(decoded.shape[0])],
            "resized_wh": [gw * ip.patch_size, gh * ip.patch_size],
            "grid_thw": [t, gh, gw],
            "n_patches": int(out["pixel_values"].shape[0]),
            "llm_tokens": t * gh * gw // ip.merge_size**2,
        }
    return tensors, info


def check_tokenizer_json(model_dir: Path, processor, texts: list[str]) -> None:
    """tokenizer.json alone (as a Rust `tokenizers` user loads it) must give the processor's ids."""
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in texts:
        a = raw.encode(text, add_special_tokens=True).ids
        b = processor.tokenizer(text)["input_ids"]
        assert a == b, (text, a, b)
        assert raw.decode(a, skip_special_tokens=False) == text, text


def check_unresized_image(img_tensors: dict, key: str) -> None:
    """An image already at a multiple of 32 must pass through the resize untouched."""
    d = img_tensors[f"decoded.{key}"].permute(2, 0, 1).float()  # C, H, W
    c, h, w = d.shape
    x = (d - 127.5) / 127.5
    x = x.reshape(c, h // 32, 2, 16, w // 32, 2, 16).permute(1, 4, 2, 5, 0, 3, 6)  # bh, bw, mh, mw, c, py, px
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, 2, -1, -1).reshape(-1, c * 2 * 16 * 16)
    assert torch.equal(x, img_tensors[f"pixel_values.{key}"]), key


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURE
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model_dir = out / "model"
    img_dir = out / "images"
    out.mkdir(parents=True, exist_ok=True)

    image_notes = write_images(img_dir)
    images = {n: load_image(img_dir / n) for n in sorted(image_notes)}

    # Processor: build, save in hub layout, and use the copy reloaded from disk from here on.
    tok, corpus_sources = build_tokenizer()
    image_processor = Qwen2VLImageProcessor(**PROCESSOR_SETTINGS)
    video_processor = Qwen3VLVideoProcessor(**VIDEO_SETTINGS)
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    assert hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest() == CHAT_TEMPLATE_SHA256
    if model_dir.exists():
        for p in model_dir.iterdir():
            p.unlink()
    processor.save_pretrained(model_dir)
    # transformers 5 writes processor_config.json (image and video settings nested in it); also write
    # the per-processor files that hub checkpoints carry.
    for sub, fname in ((image_processor, "preprocessor_config.json"), (video_processor, "video_preprocessor_config.json")):
        d = sub.to_dict()
        d["processor_class"] = "Qwen3VLProcessor"
        (model_dir / fname).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    processor = AutoProcessor.from_pretrained(model_dir)
    assert type(processor).__name__ == "Qwen3VLProcessor", type(processor)
    assert processor.image_processor.backend == "torchvision", processor.image_processor.backend
    assert processor.image_processor.size["shortest_edge"] == 4096
    assert processor.image_processor.size["longest_edge"] == 65536
    assert processor.chat_template == CHAT_TEMPLATE
    tok = processor.tokenizer
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == BPE_VOCAB + i, t

    cfg = make_config(tok)
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    eos_ids = [tok.convert_tokens_to_ids("<|im_end|>"), pad_id]

    img_tensors, img_info = image_references(processor, images, img_dir)
    check_unresized_image(img_tensors, "b")

    chosen = None
    for seed in range(64):
        model = build_model(cfg, seed)
        tensors, meta, margin = run_references(model, processor, images, pad_id)
        print(f"seed {seed}: min greedy margin {margin:.4g}")
        if margin >= MIN_MARGIN:
            chosen = seed
            break
    assert chosen is not None, "no seed gave a large enough margin"
    check_tokenizer_json(model_dir, processor, [meta["prompts"][n]["text"] for n in ("P1", "P2", "P3")])

    # Checkpoint, then prove the files on disk reproduce the references.
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        do_sample=True,
        top_k=20,
        top_p=0.8,
        temperature=0.7,
        repetition_penalty=1.0,
    )
    model.save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "model.safetensors").chmod(0o644)
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager")
    reloaded.eval()
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.language_model.embed_tokens.weight.data_ptr()
    re_tensors, _, _ = run_references(reloaded, processor, images, pad_id)
    for k, v in tensors.items():
        assert torch.equal(v, re_tensors[k]), f"reloaded checkpoint differs on {k}"

    tensors.update(img_tensors)
    # Keep the fixtures small: the per-prompt pixel values repeat the per-image ones, and large
    # per-image pixel values are pinned by the SHA-256 of their little-endian f32 bytes instead.
    pixel_sha256 = {}
    for k in sorted(tensors):
        if k.startswith("pixel_values.P"):
            del tensors[k]
        elif k.startswith("pixel_values.") and tensors[k].numel() > 100_000:
            arr = tensors.pop(k).contiguous().numpy().astype("<f4")
            pixel_sha256[k.split(".", 1)[1]] = hashlib.sha256(arr.tobytes()).hexdigest()
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, out / "reference.safetensors", metadata={"format": "pt"})

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    saved_files = sorted(p.name for p in model_dir.iterdir())
    ref = {
        "generated_by": "scripts/gen_qwen3vl_fixtures.py",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": __import__("torchvision").__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
        "seeds": {"weights": chosen, "images": IMAGE_SEED},
        "pixel_values_sha256": pixel_sha256,
        "torch_threads": 1,
        "attn_implementation": "eager",
        "dtype": "float32",
        "model_files": saved_files,
        "special_token_ids": ids,
        "vocab_size": len(tok),
        "tokenizer_corpus_sha256": corpus_sources,
        "chat_template_sha256": CHAT_TEMPLATE_SHA256,
        "decoding_rule": "PIL open -> ImageOps.exif_transpose -> PIL image to the processor "
        "(transformers convert_to_rgb: alpha over white, L -> RGB)",
        "image_processor": {
            "class": type(processor.image_processor).__name__,
            "backend": processor.image_processor.backend,
            "size": dict(processor.image_processor.size),
            "resize": "smart_resize to multiples of 32, then torchvision bicubic with antialias on uint8",
            "normalize": "(u8 - 127.5) / 127.5 in float32 (rescale 1/255 fused with mean = std = 0.5)",
        },
        "images": {k: dict(v, note=image_notes[v["file"]]) for k, v in img_info.items()},
        "greedy": {
            "new_tokens": NEW_TOKENS,
            "how": "pure argmax, EOS disabled (generate with eos_token_id=None), exactly 16 tokens; "
            "checked equal to a no-cache argmax loop over full re-forwards",
            "min_margin": margin,
            "min_margin_threshold": MIN_MARGIN,
        },
        "position_ids": "HF get_rope_index: text runs advance t=h=w together; an image's tokens get "
        "t=start, h=start+row, w=start+col (merged 2x2 grid); text after it resumes at "
        "start+max(rows, cols); rope_delta = max(position)+1-len; padding gets 0",
        **meta,
    }
    (out / "reference.json").write_text(json.dumps(ref, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"{p.stat().st_size:>10}  {p.relative_to(out)}")
    print(f"{total:>10}  total")
    print(f"weights seed {chosen}; min greedy margin {margin:.4g}")
    for name in ("P1", "P2", "P3"):
        pm = meta["prompts"][name]
        print(f"{name}: seq {pm['seq_len']}, rope_delta {pm['rope_delta']}, greedy {pm['greedy_text']!r}")
    b = meta["batch"]
    print(f"batch: L={b['seq_len']}, last-logit diff vs single {b['max_abs_last_logits_diff_vs_single']:.3g}")


if __name__ == "__main__":
    main()
