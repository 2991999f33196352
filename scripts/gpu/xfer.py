#!/usr/bin/env python3
"""The chunked transfer of base weights to the GPU machine (scripts/gpu/README.md). Standard
library only: it runs here (split, plan) and there (receive, assemble).

    xfer.py split --chunk-mib 46 --dir .xfer/weights qwen2=models/qwen2/X.gguf ...   # here
    xfer.py plan [--limit-mib 64] [--margin-mib 2]                                     # here
    xfer.py receive N                                                                  # there
    xfer.py assemble --dest /tmp/tagllm-bases [--json FILE]                            # there

.xfer/weights/MANIFEST, one record a line (whitespace-separated):
    file <base> <file name> <size> <sha256> <parts>
    part <base> <part name> <size> <sha256>
Parts are <base>.part00, <base>.part01, ... in order; their concatenation is the file.
"""

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
WEIGHTS = ".xfer/weights"
MANIFEST = f"{WEIGHTS}/MANIFEST"
MIB = 1 << 20
MAX_PATHS = 8  # carry paths per device call


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path):
    """{base: {"name", "size", "sha256", "parts": [(part name, size, sha256), ...]}}, in file order."""
    bases = {}
    for line in pathlib.Path(path).read_text().splitlines():
        f = line.split()
        if not f or f[0].startswith("#"):
            continue
        if f[0] == "file":
            bases[f[1]] = {"name": f[2], "size": int(f[3]), "sha256": f[4], "nparts": int(f[5]), "parts": []}
        elif f[0] == "part":
            bases[f[1]]["parts"].append((f[2], int(f[3]), f[4]))
    for b, e in bases.items():
        if len(e["parts"]) != e["nparts"] or sum(p[1] for p in e["parts"]) != e["size"]:
            sys.exit(f"{path}: the parts of {b} do not add up to its file")
    return bases


def cmd_split(args):
    """Splits each BASE=PATH into parts of at most --chunk-mib; keeps parts that are already right."""
    d = ROOT / args.dir
    d.mkdir(parents=True, exist_ok=True)
    chunk = int(args.chunk_mib * MIB)
    old = read_manifest(d / "MANIFEST") if (d / "MANIFEST").is_file() else {}
    lines = ["# tagllm GPU transfer manifest (scripts/gpu/prepare.sh); see scripts/gpu/xfer.py"]
    wanted = set()
    for pair in args.files:
        base, path = pair.split("=", 1)
        path = pathlib.Path(path)
        size, sha = path.stat().st_size, sha256_file(path)
        nparts = -(-size // chunk)
        prev = old.get(base)
        fresh = (
            prev is not None
            and (prev["name"], prev["size"], prev["sha256"]) == (path.name, size, sha)
            and all(p[1] == min(chunk, size - i * chunk) for i, p in enumerate(prev["parts"]))
            and prev["nparts"] == nparts
            and all((d / p[0]).is_file() and (d / p[0]).stat().st_size == p[1] for p in prev["parts"])
        )
        if fresh:
            parts = prev["parts"]
            print(f"{base}: {path.name} already in {nparts} parts")
        else:
            for stale in d.glob(f"{base}.part*"):
                stale.unlink()
            parts = []
            with open(path, "rb") as f:
                for i in range(nparts):
                    data = f.read(chunk)
                    name = f"{base}.part{i:02d}"
                    (d / name).write_bytes(data)
                    parts.append((name, len(data), hashlib.sha256(data).hexdigest()))
            print(f"{base}: {path.name} ({size} bytes) split into {nparts} parts of at most {args.chunk_mib} MiB")
        wanted.update(p[0] for p in parts)
        lines.append(f"file {base} {path.name} {size} {sha} {nparts}")
        lines += [f"part {base} {n} {s} {h}" for n, s, h in parts]
    for stale in d.glob("*.part*"):
        if stale.name not in wanted:
            print(f"removing stale {stale}")
            stale.unlink()
    (d / "MANIFEST").write_text("\n".join(lines) + "\n")


def tree_bytes():
    """What travels with every call: tracked and untracked-not-ignored files (and shared/)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout
    total, biggest = 0, []
    for name in set(out.decode().split("\0")) - {""}:
        p = ROOT / name
        if os.path.lexists(p):
            n = os.lstat(p).st_size
            total += n
            biggest.append((n, name))
    shared = ROOT / "shared"
    if shared.is_dir():
        total += path_bytes(shared)
    return total, sorted(biggest, reverse=True)[:5]


def path_bytes(p: pathlib.Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def cmd_plan(args):
    """Packs the parts, the SFT folders and the wheels into as few calls as fit; the last call trains."""
    tree, biggest = tree_bytes()
    limit = int(args.limit_mib * MIB)
    cap = limit - tree - int(args.margin_mib * MIB)
    bases = read_manifest(ROOT / MANIFEST)
    man = (ROOT / MANIFEST).stat().st_size
    print(f"working tree: {tree / MIB:.2f} MiB (largest: {', '.join(f'{n} {s / MIB:.2f} MiB' for s, n in biggest[:3])})")
    print(f"per call: {args.limit_mib} MiB - tree - {args.margin_mib} MiB margin = {cap / MIB:.2f} MiB to carry")
    if tree > 24 * MIB:
        sys.exit("the working tree is over 24 MiB: ignore or remove the large untracked files first")
    whl = path_bytes(ROOT / ".whl")
    sft = sorted(p for p in (ROOT / ".xfer/sft").glob("*") if p.is_dir())
    # items: (path, bytes, base or None); the training call always carries the wheels and MANIFEST
    items = [(f"{WEIGHTS}/{n}", s, b) for b, e in bases.items() for n, s, _ in e["parts"]]
    items += [(str(p.relative_to(ROOT)), path_bytes(p), p.name.split("-")[0]) for p in sft]
    order = {b: i for i, b in enumerate(bases)}
    train = {"paths": [MANIFEST, ".whl"], "bytes": man + whl}
    if train["bytes"] > cap:
        sys.exit("the wheels do not fit in one call")
    calls = []

    def fits(c, n):
        return c["bytes"] + n <= cap and len(c["paths"]) < MAX_PATHS

    # The training call takes the small things, smallest first: the SFT folders (remade whenever
    # the prompt changes: then only the training call needs redoing) and the last, short part of
    # each base. The transfer calls take the rest, a base at a time in priority order (so that the
    # last base's calls can be left out when time is short), largest first into the first call
    # with room.
    rest = []
    for path, n, base in sorted(items, key=lambda t: (t[1], t[0])):
        if n + man > cap:
            sys.exit(f"{path} ({n / MIB:.2f} MiB) does not fit in one call: lower CHUNK_MIB")
        if fits(train, n) and not rest:
            train["paths"].append(path)
            train["bytes"] += n
        else:
            rest.append((path, n, base))
    for path, n, base in sorted(rest, key=lambda t: (order.get(t[2], 99), -t[1], t[0])):
        target = next((c for c in calls if fits(c, n)), None)
        if target is None:
            target = {"paths": [MANIFEST], "bytes": man}
            calls.append(target)
        target["paths"].append(path)
        target["bytes"] += n
    plan = {"tree_bytes": tree, "cap_bytes": cap, "calls": []}
    lines = []
    for i, c in enumerate(calls, 1):
        bs = sorted({b for p, _, b in items if p in c["paths"]}, key=lambda b: order.get(b, 99))
        cmd = f"bash scripts/gpu/receive.sh {i} {len(calls)}"
        plan["calls"].append({"call": i, "command": cmd, "carry": c["paths"], "carry_bytes": c["bytes"], "bases": bs})
        lines.append(
            f"call {i}/{len(calls) + 1} [{' '.join(bs)}]  {(tree + c['bytes']) / MIB:.2f} MiB with the tree\n"
            f"  command: {cmd}\n  carry: {json.dumps(c['paths'])}"
        )
    tcmd = "set -o pipefail; BUDGET_S=420 bash scripts/gpu/train_all.sh 2>&1 | tee $OUT/log"
    plan["train"] = {"command": tcmd, "carry": train["paths"], "carry_bytes": train["bytes"]}
    lines.append(
        f"call {len(calls) + 1}/{len(calls) + 1} [train]  {(tree + train['bytes']) / MIB:.2f} MiB with the tree\n"
        f"  command: {tcmd}\n  carry: {json.dumps(train['paths'])}"
    )
    for b in bases:
        only = [c["call"] for c in plan["calls"] if c["bases"] == [b]]
        if only:
            lines.append(f"without {b}: leave out calls {only} (its runs are then skipped, saying so)")
    (ROOT / ".xfer/plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    print(f"{len(calls)} transfer calls, then the training call:")
    print("\n".join(lines))


def part_status(bases, verified):
    """Per base: (parts here and right, parts missing or wrong)."""
    out = {}
    for b, e in bases.items():
        ok, bad = [], []
        for name, size, sha in e["parts"]:
            p = ROOT / WEIGHTS / name
            if not p.is_file() or p.stat().st_size != size:
                bad.append(f"{name} ({'missing' if not p.is_file() else f'{p.stat().st_size} bytes, not {size}'})")
                continue
            if f"{name}:{sha}" not in verified:
                if sha256_file(p) != sha:
                    bad.append(f"{name} (sha256 differs)")
                    continue
                verified.add(f"{name}:{sha}")
            ok.append(name)
        out[b] = (ok, bad)
    return out


def cmd_receive(args):
    """Reports the parts received so far; never fails the call."""
    m = ROOT / MANIFEST
    if not m.is_file():
        print(f"call {args.n}: no {MANIFEST} here yet")
        return
    bases = read_manifest(m)
    seen = pathlib.Path("/tmp/tagllm-xfer-verified")  # sha256 checked once per part per machine
    verified = set(seen.read_text().split()) if seen.is_file() else set()
    status = part_status(bases, verified)
    seen.write_text("\n".join(sorted(verified)) + "\n")
    total = sum(len(e["parts"]) for e in bases.values())
    have = sum(len(ok) for ok, _ in status.values())
    of = f"/{args.k}" if args.k else ""
    print(f"call {args.n}{of}: {have}/{total} parts here")
    for b, (ok, bad) in status.items():
        print(f"  {b}: {'complete' if not bad else f'{len(ok)}/{len(ok) + len(bad)}, still to come: ' + ', '.join(bad)}")


def cmd_assemble(args):
    """Joins each complete base into --dest and checks its sha256; prints (and writes) what is ready."""
    bases = read_manifest(ROOT / MANIFEST)
    dest = pathlib.Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    ready = {}
    for b, e in bases.items():
        target = dest / e["name"]
        if target.is_file() and target.stat().st_size == e["size"] and sha256_file(target) == e["sha256"]:
            print(f"{b}: {target} already assembled, sha256 ok")
            ready[b] = str(target)
            continue
        missing = [
            n for n, s, _ in e["parts"] if not (ROOT / WEIGHTS / n).is_file() or (ROOT / WEIGHTS / n).stat().st_size != s
        ]
        if missing:
            print(f"{b}: SKIP, {len(missing)} of {len(e['parts'])} parts missing or short: {' '.join(missing)}")
            continue
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for n, _, _ in e["parts"]:
                with open(ROOT / WEIGHTS / n, "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        if sha256_file(tmp) != e["sha256"]:
            tmp.unlink()
            print(f"{b}: SKIP, the assembled {e['name']} does not have the manifest's sha256")
            continue
        tmp.rename(target)
        print(f"{b}: {target} assembled from {len(e['parts'])} parts, sha256 ok")
        ready[b] = str(target)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(ready) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("--chunk-mib", type=float, default=46)
    s.add_argument("--dir", default=WEIGHTS)
    s.add_argument("files", nargs="+", help="BASE=PATH")
    p = sub.add_parser("plan")
    p.add_argument("--limit-mib", type=float, default=64)
    p.add_argument("--margin-mib", type=float, default=2)
    r = sub.add_parser("receive")
    r.add_argument("n")
    r.add_argument("k", nargs="?")
    a = sub.add_parser("assemble")
    a.add_argument("--dest", default="/tmp/tagllm-bases")
    a.add_argument("--json")
    args = ap.parse_args()
    {"split": cmd_split, "plan": cmd_plan, "receive": cmd_receive, "assemble": cmd_assemble}[args.cmd](args)


if __name__ == "__main__":
    main()
