"""Generates resize reference cases: torch uint8 bicubic antialias on deterministic images.

Usage: /work/venvs/hf/bin/python scripts/gen_resize_refs.py tests/fixtures/qwen3vl/imgproc/resize_torch.json
(torch as pinned in scripts/qwen3vl-requirements.txt; CI does not need it.)
Images come from splitmix64 (see tests/it/image_proc.rs for the same generator).
"""
import json, sys, os
import numpy as np
import torch

M64 = (1 << 64) - 1
np.seterr(over="ignore")

def splitmix_bytes(seed, n):
    i = np.arange(1, n + 1, dtype=np.uint64)
    z = np.uint64(seed) + i * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z

def make_image(h, w, seed, mode):
    z = splitmix_bytes(seed, h * w * 3)
    if mode == 0:  # uniform noise
        b = (z >> np.uint64(56)).astype(np.uint8)
    elif mode == 1:  # binary 0/255 noise: largest overshoot
        b = np.where((z >> np.uint64(63)) == 1, 255, 0).astype(np.uint8)
    else:  # smooth ramp with a little noise
        idx = np.arange(h * w * 3, dtype=np.int64)
        c = idx % 3; x = (idx // 3) % w; y = idx // (3 * w)
        b = ((x * 3 + y * 5 + c * 71 + (z >> np.uint64(62)).astype(np.int64)) & 255).astype(np.uint8)
    return b.reshape(h, w, 3)

def fnv1a(arr):
    h = 0xcbf29ce484222325
    data = arr.tobytes()
    # vectorised enough for our sizes
    for byte in data:
        h ^= byte
        h = (h * 0x100000001b3) & M64
    return h

def fnv1a_fast(arr):
    # chunked pure-python is slow for big outputs; use numpy loop over bytes via reduce is not
    # possible (sequential); fall back to hashlib-free approach: process in python but with bytes
    h = 0xcbf29ce484222325
    for byte in arr.tobytes():
        h = ((h ^ byte) * 0x100000001b3) & M64
    return h

def resize(img, oh, ow, channels_last):
    t = torch.from_numpy(img).permute(2, 0, 1).contiguous()[None]
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(t, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).contiguous().numpy()

def cases():
    rng = np.random.default_rng(1234)
    out = []
    for k in range(2500):  # small, any direction, 1-pixel sides included
        ih, iw = int(rng.integers(1, 120)), int(rng.integers(1, 120))
        oh, ow = int(rng.integers(1, 120)), int(rng.integers(1, 120))
        out.append((ih, iw, oh, ow))
    for k in range(300):  # medium
        ih, iw = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        oh, ow = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        out.append((ih, iw, oh, ow))
    for k in range(100):  # heavy downscale
        ih, iw = int(rng.integers(500, 3000)), int(rng.integers(500, 3000))
        oh, ow = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        out.append((ih, iw, oh, ow))
    for k in range(100):  # heavy upscale
        ih, iw = int(rng.integers(1, 8)), int(rng.integers(1, 8))
        oh, ow = int(rng.integers(100, 900)), int(rng.integers(100, 900))
        out.append((ih, iw, oh, ow))
    # Qwen-like: realistic photos to multiples of 32, one side equal
    for (ih, iw) in [(480, 640), (1080, 1920), (600, 800), (333, 500), (1024, 768), (250, 37), (37, 250), (1, 200), (200, 1), (64, 64)]:
        out.append((ih, iw, max(32, round(ih / 32) * 32), max(32, round(iw / 32) * 32)))
    out += [(100, 77, 100, 64), (77, 100, 64, 100), (5, 5, 5, 5), (1, 1, 1, 1), (1, 1, 7, 3), (3, 7, 1, 1)]
    return out

def main():
    dst = sys.argv[1]
    res = []
    for k, (ih, iw, oh, ow) in enumerate(cases()):
        seed = (k * 7919 + 17) & M64
        mode = k % 3
        img = make_image(ih, iw, seed, mode)
        case = {"in_h": ih, "in_w": iw, "out_h": oh, "out_w": ow, "seed": seed, "mode": mode}
        try:
            a = resize(img, oh, ow, False)
        except RuntimeError as e:
            # torch's AVX kernel asserts when a 1x1 output looks channels-last (not a Qwen size)
            print("torch failed", case, str(e)[:80], file=sys.stderr)
            continue
        res.append([ih, iw, oh, ow, seed, mode, format(fnv1a_fast(a), "016x")])
    # The layout tests/it/image_proc.rs reads: {"meta": {...}, "cases": [[in_h, in_w, out_h, out_w,
    # seed, mode, fnv1a], ...]}, one case a line.
    meta = {"generator": "gen_resize_refs.py", "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(),
            "note": "torch.nn.functional.interpolate(uint8 NCHW contiguous, mode=bicubic, antialias=True); "
                    "images from splitmix64; fnv1a-64 of HWC output"}
    with open(dst, "w") as f:
        f.write('{"meta": ' + json.dumps(meta) + ',\n"cases": [\n' + ",\n".join(json.dumps(c) for c in res) + "\n]}\n")
    print(len(res), "cases", torch.backends.cpu.get_cpu_capability())

if __name__ == "__main__":
    main()
