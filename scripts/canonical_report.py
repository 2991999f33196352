#!/usr/bin/env python3
"""Validate the canonical synonym files and report how many training tag values they merge.

Usage (from the repository root, standard library only):

    python3 scripts/canonical_report.py [--train DIR] [--canonical DIR] [--brand FILE] [--handbook FILE]

Reads the teacher annotations of the training split (`teacher.tags` of every record in
datasets/distill/train/*.jsonl; never the eval or distill-second sets) and the synonym files
models/vocab/canonical/<dimension>.txt, whose lines are `canonical | alias | alias ...` (`#` starts a
comment line). Values and spellings are normalized like tag values: Unicode NFKC, trimmed, runs of
whitespace collapsed to one space, Latin letters lowercased (other scripts keep their case).

Validation (exit status 1, one message per problem on stderr):
  - a file named after a dimension key that models/handbook.toml does not define;
  - a line with fewer than 2 spellings, or an empty spelling;
  - a spelling listed twice on one line, or on two lines of one file (after normalization).
A canonical spelling that is not the most frequent training spelling of its line only warns.

Prints a markdown table: per dimension, the distinct normalized training values before and after
mapping through its file, how many merged, and how many tag occurrences the mapping rewrites; then
totals, and the same numbers for `brand` using models/vocab/brand.txt.
"""

import argparse
import collections
import glob
import json
import os
import re
import sys
import unicodedata

SKIPPED = ("brand", "price_band")  # brand has models/vocab/brand.txt; price bands are not synonyms


def _is_latin_letter(ch):
    # The same ranges as src/domain/normalize.rs: Basic Latin letters, Latin-1 Supplement letters,
    # Latin Extended-A/B, Latin Extended Additional.
    o = ord(ch)
    return ch.isalpha() and (0x41 <= o <= 0x5A or 0x61 <= o <= 0x7A or 0xC0 <= o <= 0x24F
                             or 0x1E00 <= o <= 0x1EFF)


def normalize(value):
    s = " ".join(unicodedata.normalize("NFKC", value).split())
    return "".join(ch.lower() if _is_latin_letter(ch) else ch for ch in s)


def has_cjk(s):
    return any("\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" for ch in s)


def handbook_dimension_keys(path):
    """Dimension keys of handbook.toml, read with a small line parser (no tomllib needed)."""
    keys = set()
    in_dimension = False
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
            if not line:
                continue
            if line.startswith("["):
                in_dimension = line.replace(" ", "") in ("[[category.dimension]]", "[[fallback.dimension]]")
                continue
            m = re.match(r'key\s*=\s*"([^"]*)"', line)
            if m and in_dimension:
                keys.add(m.group(1))
                in_dimension = False
    return keys


def load_training_values(train_dir):
    counts = collections.defaultdict(collections.Counter)
    files = sorted(glob.glob(os.path.join(train_dir, "*.jsonl")))
    if not files:
        sys.exit(f"error: no *.jsonl under {train_dir}")
    records = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                record = json.loads(line)
                records += 1
                tags = (record.get("teacher") or {}).get("tags") or {}
                for dim, values in tags.items():
                    for v in values:
                        counts[dim][normalize(v)] += 1
    return counts, records, len(files)


def parse_alias_file(path, errors, check_lines=True):
    """Returns (groups, mapping): groups as lists of normalized spellings, mapping spelling -> canonical."""
    groups, mapping, where = [], {}, {}
    name = os.path.relpath(path)
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            spellings = [normalize(t) for t in line.split("|")]
            if check_lines:
                if any(not s for s in spellings):
                    errors.append(f"{name}:{lineno}: empty spelling in {line!r}")
                if len([s for s in spellings if s]) < 2:
                    errors.append(f"{name}:{lineno}: fewer than 2 spellings in {line!r}")
            spellings = [s for s in spellings if s]
            seen = set()
            for s in spellings:
                if s in seen:
                    errors.append(f"{name}:{lineno}: {s!r} listed twice on one line")
                elif s in where:
                    errors.append(f"{name}:{lineno}: {s!r} already on line {where[s]}")
                seen.add(s)
                where.setdefault(s, lineno)
                mapping.setdefault(s, spellings[0])
            if spellings:
                groups.append((lineno, spellings))
    return groups, mapping


def merge_stats(counts, mapping):
    before = len(counts)
    after = len({mapping.get(v, v) for v in counts})
    rewritten = sum(n for v, n in counts.items() if mapping.get(v, v) != v)
    return before, after, before - after, rewritten


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", default="datasets/distill/train")
    ap.add_argument("--canonical", default="models/vocab/canonical")
    ap.add_argument("--brand", default="models/vocab/brand.txt")
    ap.add_argument("--handbook", default="models/handbook.toml")
    args = ap.parse_args()

    errors, warnings = [], []
    dim_keys = handbook_dimension_keys(args.handbook)
    counts, n_records, n_files = load_training_values(args.train)

    files = {}
    for path in sorted(glob.glob(os.path.join(args.canonical, "*.txt"))):
        dim = os.path.splitext(os.path.basename(path))[0]
        if dim not in dim_keys:
            errors.append(f"{os.path.relpath(path)}: {dim!r} is not a dimension key of {args.handbook}")
            continue
        groups, mapping = parse_alias_file(path, errors)
        files[dim] = (groups, mapping)
        for lineno, spellings in groups:
            c = counts.get(dim, {})
            best = max(c.get(s, 0) for s in spellings)
            first = c.get(spellings[0], 0)
            tie_prefers = [s for s in spellings if c.get(s, 0) == best]
            if first < best or (first == best and not has_cjk(spellings[0])
                                and any(has_cjk(s) for s in tie_prefers)):
                warnings.append(f"{os.path.relpath(path)}:{lineno}: canonical {spellings[0]!r} "
                                f"({first}) is not the most frequent training spelling "
                                f"({', '.join(f'{s!r}={c.get(s, 0)}' for s in spellings)})")

    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        print(f"{len(errors)} error(s) in the canonical files", file=sys.stderr)
        return 1

    dims = sorted((set(counts) | set(files)) - set(SKIPPED))
    print(f"Training split: {n_records} records in {n_files} files ({args.train}); "
          f"values normalized (NFKC, trimmed, whitespace collapsed, Latin lowercased).")
    print()
    print("| dimension | groups | distinct before | distinct after | merged | tags rewritten |")
    print("|---|---:|---:|---:|---:|---:|")
    tot = [0, 0, 0, 0, 0]
    for dim in dims:
        groups, mapping = files.get(dim, ([], {}))
        b, a, m, r = merge_stats(counts.get(dim, {}), mapping)
        g = len(groups)
        print(f"| {dim} | {g if dim in files else '-'} | {b} | {a} | {m} | {r} |")
        for i, x in enumerate((g, b, a, m, r)):
            tot[i] += x
    print(f"| **total (all but brand, price_band)** | {tot[0]} | {tot[1]} | {tot[2]} | {tot[3]} | {tot[4]} |")

    if os.path.exists(args.brand):
        brand_errors = []
        groups, mapping = parse_alias_file(args.brand, brand_errors, check_lines=False)
        b, a, m, r = merge_stats(counts.get("brand", {}), mapping)
        multi = sum(1 for _, s in groups if len(s) > 1)
        print(f"| brand ({os.path.relpath(args.brand)}: {len(groups)} brands, {multi} with aliases) "
              f"| {multi} | {b} | {a} | {m} | {r} |")
        for e in brand_errors:
            print(f"warning: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
