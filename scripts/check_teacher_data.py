#!/usr/bin/env python3
"""Checks teacher-dataset files (datasets/distill/**/*.jsonl) against the handbook and the limits.

Usage: python3 scripts/check_teacher_data.py FILE_OR_DIR [...]

Each line is one note with the teacher's three CoT steps (format: datasets/distill/README.md):
  {"note_id", "category", "title", "body", "images", "lang",
   "teacher": {"about": str,
               "candidates": {dim: [{"value": str, "evidence": str}, ...]},
               "tags": {dim: [str, ...]}}}
The rules mirror what the server enforces on a model's answer (src/tagging/tags.rs, src/domain/limits.rs):
dimension keys of the note's category (aliases resolve; unknown categories use the fallback), at most
3 tags per dimension, 24 tags per note, 24 characters per tag, no tag repeated within a dimension
after normalization, and every final tag drawn from the step-2 candidates of its dimension.
Exits 1 with one line per problem. Standard library only (Python 3.11+).
"""

import json
import pathlib
import sys
import tomllib
import unicodedata

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_PER_DIM, MAX_PER_NOTE, MAX_CHARS = 3, 24, 24


def normalize(value: str) -> str:
    s = unicodedata.normalize("NFKC", value).strip()
    s = " ".join(s.split())
    return "".join(c.lower() if c.isascii() or "LATIN" in unicodedata.name(c, "") else c for c in s)


def load_handbook():
    hb = tomllib.loads((ROOT / "models/handbook.toml").read_text())
    cats = {}
    for c in hb.get("category", []):
        dims = [d["key"] for d in c["dimension"]]
        for name in [c["key"], *c.get("aliases", [])]:
            cats[normalize(name)] = (c["key"], dims)
    fallback = (hb["fallback"]["key"], [d["key"] for d in hb["fallback"]["dimension"]])
    return cats, fallback


def check_line(rec, cats, fallback, where, problems, seen):
    def bad(msg):
        problems.append(f"{where}: {msg}")

    for field in ("note_id", "category", "title", "body", "lang", "teacher"):
        if field not in rec:
            bad(f"missing {field}")
            return
    if rec["note_id"] in seen:
        bad(f"duplicate note_id {rec['note_id']}")
    seen.add(rec["note_id"])
    if rec["lang"] not in ("zh", "en", "mixed"):
        bad(f"lang {rec['lang']!r} is not zh, en or mixed")
    if not (rec["title"].strip() or rec["body"].strip()):
        bad("empty note")
    if len(rec["title"]) > 200 or len(rec["body"]) > 4000:
        bad("title over 200 or body over 4000 characters")
    _key, dims = cats.get(normalize(rec["category"]), fallback)
    t = rec["teacher"]
    if not isinstance(t.get("about"), str) or not t["about"].strip():
        bad("teacher.about missing")
    cands = t.get("candidates", {})
    tags = t.get("tags", {})
    for dim, items in cands.items():
        if dim not in dims:
            bad(f"candidate dimension {dim!r} not in {dims}")
        for it in items:
            if not isinstance(it, dict) or not it.get("value") or not it.get("evidence"):
                bad(f"candidate in {dim!r} needs value and evidence: {it!r}")
    total = 0
    for dim, values in tags.items():
        if dim not in dims:
            bad(f"tag dimension {dim!r} not in {dims}")
            continue
        if not values:
            bad(f"empty tag list for {dim!r} (leave the dimension out)")
        if len(values) > MAX_PER_DIM:
            bad(f"{dim!r} has {len(values)} tags (max {MAX_PER_DIM})")
        norm = [normalize(v) for v in values]
        if len(set(norm)) != len(norm):
            bad(f"{dim!r} repeats a tag")
        cand_values = {normalize(c.get("value", "")) for c in cands.get(dim, []) if isinstance(c, dict)}
        for v in values:
            total += 1
            if not isinstance(v, str) or not v.strip():
                bad(f"{dim!r} has an empty tag")
            elif any(c in '"\\' or ord(c) < 32 or ord(c) == 127 for c in v) or v != v.strip():
                bad(f"{dim!r} tag {v!r} has a quote, backslash, control character or edge space (the grammar cannot write it)")
            elif len(v) > MAX_CHARS:
                bad(f"{dim!r} tag {v!r} is over {MAX_CHARS} characters")
            elif normalize(v) not in cand_values:
                bad(f"{dim!r} tag {v!r} is not among its step-2 candidates")
    if total > MAX_PER_NOTE:
        bad(f"{total} tags (max {MAX_PER_NOTE})")


def main(argv):
    cats, fallback = load_handbook()
    files = []
    for a in argv:
        p = pathlib.Path(a)
        files += sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
    problems, seen, count = [], set(), 0
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{f}:{i}: not JSON: {e}")
                continue
            count += 1
            check_line(rec, cats, fallback, f"{f}:{i}", problems, seen)
    for p in problems:
        print(p)
    print(f"{count} notes in {len(files)} files, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(ROOT / "datasets/distill")]))
