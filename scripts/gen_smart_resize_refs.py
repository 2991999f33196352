"""smart_resize reference cases from transformers 5.23's own function.

Usage: /work/venvs/hf/bin/python scripts/gen_smart_resize_refs.py tests/fixtures/qwen3vl/imgproc/smart_resize.json
"""
import json, sys
import numpy as np
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

rng = np.random.default_rng(99)
budgets = [(65536, 16777216), (4096, 65536), (56 * 56, 28 * 28 * 1280), (0, 1 << 20), (1 << 20, 1 << 20)]
cases = []
def add(h, w, f, lo, hi):
    try:
        r = list(smart_resize(h, w, factor=f, min_pixels=lo, max_pixels=hi))
    except ValueError as e:
        r = "aspect" if "aspect" in str(e) else "error"
    except ZeroDivisionError:
        r = "error"
    cases.append([h, w, f, lo, hi, r])

for _ in range(4000):
    f = int(rng.choice([28, 32, 16, 14]))
    lo, hi = budgets[int(rng.integers(len(budgets)))]
    scale = int(rng.choice([10, 100, 1000, 10000]))
    h, w = int(rng.integers(1, scale + 1)), int(rng.integers(1, scale + 1))
    add(h, w, f, lo, hi)
for k in range(0, 200):  # exact .5 ties
    for f in (32, 28):
        lo, hi = budgets[k % 3]
        add(f * k + f // 2, f * (k + 3) + f // 2, f, lo, hi)
        add(f * k + f // 2, 1000, f, 0, 1 << 40)
for h, w in [(1, 200), (1, 201), (2, 401), (2, 400), (3, 600), (3, 601), (200, 1), (201, 1), (1, 1), (10000, 50), (50, 10001)]:
    for lo, hi in budgets:
        add(h, w, 32, lo, hi)
json.dump(cases, open(sys.argv[1], "w"), separators=(",", ":"))
print(len(cases), sum(1 for c in cases if isinstance(c[5], str)), "errors")
