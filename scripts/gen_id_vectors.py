#!/usr/bin/env python3
"""Regenerates tests/fixtures/id_vectors.json: tag-normalization and stable-hash test vectors.

The ids are computed here by an independent implementation of the rules in models/HANDBOOK.md
(Python's `unicodedata` for NFKC and the `xxhash` package for XXH3-64), so the Rust test that reads
the file checks tagllm against a second implementation, not against itself.

    python3 -m pip install xxhash==3.5.0
    python3 scripts/gen_id_vectors.py
"""
import json
import pathlib
import unicodedata

import xxhash

SEED = 0
MASK = 0x7FFF_FFFF_FFFF_FFFF


def is_latin(c: str) -> bool:
    o = ord(c)
    in_range = 0x41 <= o <= 0x5A or 0x61 <= o <= 0x7A or 0xC0 <= o <= 0x24F or 0x1E00 <= o <= 0x1EFF
    return in_range and c.isalpha()


def normalize(value: str) -> str:
    nfkc = unicodedata.normalize("NFKC", value)
    words = nfkc.split()
    return " ".join("".join(c.lower() if is_latin(c) else c for c in w) for w in words)


def stable_hash(dimension: str, value: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{dimension}:{value}".encode("utf-8"), seed=SEED) & MASK


CASES = [
    ("brand", "Nike"), ("brand", "NIKE"), ("brand", "ＮＩＫＥ"), ("brand", "  Nike  "),
    ("brand", "Air Jordan"), ("brand", "ＡＩＲ　 Jordan"), ("brand", "air\tjordan"),
    ("brand", "李宁"), ("brand", "安踏"), ("brand", "New Balance"), ("brand", "Onitsuka Tiger"),
    ("brand", "L'Oréal"), ("brand", "LA ROCHE-POSAY"), ("brand", "雅诗兰黛"), ("brand", "SK-II"),
    ("colorway", "Chicago"), ("colorway", "熊猫配色"), ("colorway", "Panda （黑白）"),
    ("series", "Dunk Low"), ("series", "Air Force 1 '07"), ("series", "990v6"),
    ("price_band", "¥500-1000"), ("price_band", "￥５００－１０００"), ("price_band", "入门价位"),
    ("scene", "通勤"), ("scene", "Basketball"), ("scene", "city walk"), ("scene", "City  Walk"),
    ("style", "Y2K"), ("style", "老钱风"), ("style", "Old Money"), ("style", "ＣＩＴＹＢＯＹ"),
    ("destination", "東京"), ("destination", "Zürich"), ("destination", "ZÜRICH"),
    ("destination", "İstanbul"), ("cuisine", "한식"), ("cuisine", "Ελληνική"),
    ("dish", "🍜 ramen"), ("key_feature", "①降噪"), ("key_feature", "ｅＳＩＭ"),
    ("fit", "Oversize"), ("shade", "#01 Rose"), ("texture", "ﾏｯﾄ"),
]


def main() -> None:
    out = {
        "rules": "normalize: NFKC, split on whitespace, join with one space, lowercase Latin letters; "
        "hash: XXH3-64 seed 0 of UTF-8 'dimension:value' & 0x7fffffffffffffff",
        "xxhash": xxhash.VERSION,
        "cases": [],
    }
    for dim, raw in CASES:
        norm = normalize(raw)
        h = stable_hash(dim, norm)
        out["cases"].append(
            {"dimension": dim, "raw_value": raw, "normalized": norm, "hash": h, "hash_mod_2_20": h % (1 << 20)}
        )
    path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/id_vectors.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(CASES)} cases to {path}")


if __name__ == "__main__":
    main()
