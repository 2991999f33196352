#!/usr/bin/env python3
"""THERE: trains the candidates of scripts/gpu/plan.tsv in priority order within a wall-clock
budget (called by scripts/gpu/train_all.sh, which installs the wheel and assembles the bases).

Before each run it estimates the run's seconds: a fixed cost (interpreter, GGUF parse and
dequantization, logits check, saving; measured by the runs so far on the same base, else a default)
+ the held-out loss before and after (eval tokens x 2 at EVAL_SPEEDUP x the training speed) + the
training tokens (examples' prompt + completion, x epochs) at the base's tokens/s (the slowest
measured so far on that base, else a default). A run that would not fit in what is left of the
budget is skipped, saying so; the very first run starts whenever a minute of training fits, since it
is what measures the speed. Every run also gets --max-seconds (what is left minus its fixed and
eval cost) so that a wrong estimate cannot overrun the budget: such a run stops early, keeps its
adapter and says so (summary "stopped_early").

Each finished run: $OUT/<name>.tar holding models/<base>/<name>.lora/{adapter_config.json,
adapter_model.safetensors, training.json, tagllm.json} (tagllm.json: the prompt style, which the
server's `model.prompt = "auto"` reads). $OUT/summary.json: every run, done or skipped, rewritten
after each run. At most MAX_TARS tars (6: $OUT comes back as at most 8 files, with summary.json
and the log).

plan.tsv, one run a line (whitespace-separated; '#' starts a comment):
    name  base  sft  aux  distill.py args...
name: [A-Za-z0-9._-]+; base: a base of .xfer/weights/MANIFEST (qwen2, smollm2); sft: a folder of
SFT_ROOT (<base>-<style>, holding train/ and eval/); aux: '-' or 'cot' (--aux-tokens
train/tokens_cot.jsonl.gz: the rationale, then the answer, as extra examples) or a file of the sft
folder.
"""

import argparse
import gzip
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
# First-run guesses per base (an H100, batch 8, bf16 autocast); measured speeds replace them.
# SmolLM2-135M measured 24,000 tokens/s and ~12 s of fixed cost on an H100 (its training.json).
DEFAULTS = {"smollm2": {"tps": 18000, "fixed_s": 30}, "qwen2": {"tps": 8000, "fixed_s": 50}}
FALLBACK = {"tps": 5000, "fixed_s": 60}
EVAL_SPEEDUP = 3.0  # forward only, no_grad: about 3x the training tokens/s
SLACK_S = 10  # tar, summary, process exit
MIN_TRAIN_S = 60  # the first run starts when at least this much training fits
DISTILL_DEFAULTS = {"epochs": 4.0, "batch": 8, "limit": 0, "max_steps": 0}  # scripts/distill.py's


def log(msg):
    print(f"[train_all {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_ids(path):
    """[(prompt length, completion length)] of a tokens file (.jsonl or .jsonl.gz)."""
    raw = pathlib.Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    out = []
    for line in raw.decode().splitlines():
        if line.strip():
            d = json.loads(line)
            out.append((len(d["prompt_ids"]), len(d["completion_ids"])))
    return out


def find_tokens(folder: pathlib.Path, stem: str):
    for name in (f"{stem}.jsonl.gz", f"{stem}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    return None


def distill_opts(args):
    """The options of distill.py's args that the estimate needs (its defaults otherwise)."""
    o = dict(DISTILL_DEFAULTS)
    it = iter(args)
    for a in it:
        key, _, val = a.partition("=")
        k = key.lstrip("-").replace("-", "_")
        if key.startswith("--") and k in o:
            o[k] = type(o[k])(val if val else next(it))
    return o


def parse_plan(path):
    runs = []
    for i, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        f = line.split(None, 4)
        if len(f) < 4:
            sys.exit(f"{path}:{i}: want 'name base sft aux [distill.py args]'")
        name, base, sft, aux = f[:4]
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or any(r["name"] == name for r in runs):
            sys.exit(f"{path}:{i}: run name {name!r} is not [A-Za-z0-9._-]+ or not unique")
        runs.append({"name": name, "base": base, "sft": sft, "aux": aux, "args": shlex.split(f[4]) if len(f) > 4 else []})
    return runs


def plain(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    """Tar members as a checkout would have them: 0644, no owner."""
    ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = 0o644, 0, 0, "", ""
    return ti


def run_distill(cmd, logfile, timeout):
    """Runs cmd, echoing its output with a prefix; kills it after timeout seconds. Returns (rc, killed)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def pump():
        with open(logfile, "w") as lf:
            for line in proc.stdout:
                lf.write(line)
                if "FutureWarning" in line or line.strip() == "warnings.warn(":
                    continue
                print("    " + line, end="", flush=True)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        proc.wait(timeout=max(1, timeout))
        killed = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        killed = True
    t.join(timeout=5)
    return proc.returncode, killed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=os.environ.get("PLAN", "scripts/gpu/plan.tsv"))
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    ap.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", 420)))
    ap.add_argument("--start", type=float, default=time.time(), help="when the budget started (epoch seconds)")
    ap.add_argument("--bases-json", required=True, help="{base: assembled GGUF path} (xfer.py assemble)")
    ap.add_argument("--sft-root", default=os.environ.get("SFT_ROOT", ".xfer/sft"))
    ap.add_argument("--runs-dir", default=os.environ.get("RUNS_DIR", "/tmp/tagllm-runs"))
    ap.add_argument("--device", default=os.environ.get("DEVICE", ""))
    ap.add_argument("--python", default=os.environ.get("PY", "python3"))
    ap.add_argument("--max-tars", type=int, default=int(os.environ.get("MAX_TARS", 6)))
    ap.add_argument(
        "--dry-run",
        action="store_true",
        default=os.environ.get("DRY_RUN", "") not in ("", "0"),
        help="print the estimates and what would run, as if each run took its estimate",
    )
    a = ap.parse_args()

    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = pathlib.Path(a.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    bases = json.loads(pathlib.Path(a.bases_json).read_text())
    sft_root = ROOT / a.sft_root if not os.path.isabs(a.sft_root) else pathlib.Path(a.sft_root)
    plan = parse_plan(ROOT / a.plan if not os.path.isabs(a.plan) else a.plan)
    measured = {}  # base -> {"tps": [..], "fixed_s": [..]}
    summary = {"budget_s": a.budget, "plan": a.plan, "device": a.device or "distill.py's default", "bases": bases, "runs": []}
    started = 0
    tars = 0
    simulated = 0.0  # --dry-run: the seconds the runs "took"

    def left():
        return a.budget - (time.time() - a.start) - simulated

    def write_summary():
        summary["wall_s"] = round(time.time() - a.start, 1)
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(out / "summary.json")

    log(f"{len(plan)} runs planned, budget {a.budget:.0f} s, {left():.0f} s left; bases ready: {', '.join(bases) or 'none'}")
    for r in plan:
        rec = {k: r[k] for k in ("name", "base", "sft", "aux")}
        rec["args"] = " ".join(r["args"])
        summary["runs"].append(rec)

        def skip(why):
            rec["status"] = "skipped"
            rec["reason"] = why
            log(f"SKIP {r['name']}: {why}")
            write_summary()

        if r["base"] not in bases:
            skip(f"base {r['base']} is not here (its parts did not all arrive, or it was not sent)")
            continue
        sdir = sft_root / r["sft"]
        train, held = find_tokens(sdir / "train", "tokens"), find_tokens(sdir / "eval", "tokens")
        if train is None:
            skip(f"no SFT data in {sdir}/train (prepare.sh made none for {r['sft']}?)")
            continue
        aux = None
        if r["aux"] != "-":
            aux = find_tokens(sdir / "train", "tokens_cot") if r["aux"] == "cot" else sdir / r["aux"]
            if aux is None or not aux.is_file():
                skip(f"no aux tokens {r['aux']} in {sdir}")
                continue
        if tars >= a.max_tars:
            skip(f"no $OUT file left for its adapter ({a.max_tars} tars already)")
            continue

        # the estimate
        o = distill_opts(r["args"])
        main_ids = read_ids(train)
        aux_ids = read_ids(aux) if aux else []
        if o["limit"]:
            main_ids, aux_ids = main_ids[: o["limit"]], aux_ids[: o["limit"]]
        ex = main_ids + aux_ids
        per_epoch = sum(p + c for p, c in ex)
        spe = math.ceil(len(ex) / o["batch"])
        steps = max(1, round(spe * o["epochs"]))
        if o["max_steps"]:
            steps = min(steps, o["max_steps"])
        train_tokens = per_epoch * steps / spe
        eval_tokens = 2 * sum(p + c for p, c in read_ids(held)) if held else 0
        m = measured.get(r["base"])
        d = DEFAULTS.get(r["base"], FALLBACK)
        tps = min(m["tps"]) if m else float(os.environ.get(f"TPS_{r['base'].upper()}", d["tps"]))
        fixed = max(m["fixed_s"]) if m else float(os.environ.get(f"FIXED_{r['base'].upper()}", d["fixed_s"]))
        eval_s = eval_tokens / (EVAL_SPEEDUP * tps)
        train_s = train_tokens / tps
        est = fixed + eval_s + train_s + SLACK_S
        rec.update(
            examples=len(main_ids), aux_examples=len(aux_ids), steps_planned=steps,
            train_tokens_est=round(train_tokens), estimate_s=round(est, 1),
            speed_source="measured" if m else "default",
        )
        remaining = left()
        guard = remaining - fixed - eval_s - SLACK_S
        first = started == 0
        if est > remaining and not (first and guard >= MIN_TRAIN_S):
            skip(
                f"needs ~{est:.0f} s ({train_tokens / 1e6:.2f} M tokens at {tps:.0f} tok/s "
                f"{'measured' if m else 'guessed'} + {fixed + eval_s:.0f} s fixed and eval), {remaining:.0f} s left"
            )
            continue
        log(
            f"RUN {r['name']} ({r['base']}, {r['sft']}{', aux ' + r['aux'] if aux else ''}): {len(ex)} examples, "
            f"{steps} steps, ~{train_tokens / 1e6:.2f} M tokens; estimate {est:.0f} s "
            f"({'measured' if m else 'guessed'} {tps:.0f} tok/s), {remaining:.0f} s left"
            + ("; the first run starts even on a guess that does not fit: --max-seconds guards it" if est > remaining else "")
        )
        started += 1
        if a.dry_run:
            simulated += est
            tars += 1
            rec["status"] = "dry-run"
            continue
        rdir = runs_dir / r["name"]
        if rdir.exists():
            for f in rdir.iterdir():
                f.unlink()
        rdir.mkdir(parents=True, exist_ok=True)
        cmd = [a.python, "scripts/distill.py", "--tokens", str(train), "--gguf", bases[r["base"]], "--out", str(rdir)]
        if held:
            cmd += ["--eval-tokens", str(held)]
        if aux:
            cmd += ["--aux-tokens", str(aux)]
        if a.device:
            cmd += ["--device", a.device]
        cmd += r["args"] + ["--max-seconds", f"{max(MIN_TRAIN_S / 2, guard):.0f}"]
        rec["command"] = " ".join(shlex.quote(c) for c in cmd)
        t0 = time.time()
        rc, killed = run_distill(cmd, runs_dir / f"{r['name']}.log", remaining - SLACK_S)
        wall = time.time() - t0
        rec["wall_s"] = round(wall, 1)
        tj = rdir / "training.json"
        if rc != 0 or not tj.is_file():
            rec["status"] = "failed"
            rec["reason"] = "killed at the end of the budget" if killed else f"distill.py exited with {rc} (see the log above)"
            log(f"FAILED {r['name']}: {rec['reason']}")
            write_summary()
            continue
        s = json.loads(tj.read_text())["summary"]
        rec["training"] = s
        for k in ("tokens_per_second", "train_seconds", "eval_loss_before", "eval_loss_after", "steps", "device"):
            rec[k] = s.get(k)
        rec["status"] = "stopped_early" if s.get("stopped_early") else "done"
        if s.get("stopped_early"):
            rec["reason"] = s["stopped_early"]
        mb = measured.setdefault(r["base"], {"tps": [], "fixed_s": []})
        if s["steps"] >= 5:  # a speed from a few steps is mostly warm-up
            mb["tps"].append(s["tokens_per_second"])
            mb["fixed_s"].append(max(0.0, wall - s["train_seconds"] - eval_tokens / (EVAL_SPEEDUP * s["tokens_per_second"])))
        elif not mb["fixed_s"]:
            measured.pop(r["base"])
        # the prompt style the adapter must be served with
        style = r["sft"].rsplit("-", 1)[-1]
        sj = train.parent / "sft.json"
        if sj.is_file():
            rec["sft_json"] = json.loads(sj.read_text())
            style = rec["sft_json"].get("prompt", style)
        (rdir / "tagllm.json").write_text(json.dumps({"prompt": style}, indent=2) + "\n")
        tar = out / f"{r['name']}.tar"
        prefix = f"models/{r['base']}/{r['name']}.lora"
        with tarfile.open(tar, "w") as tf:
            for f in ("adapter_config.json", "adapter_model.safetensors", "training.json", "tagllm.json"):
                tf.add(rdir / f, arcname=f"{prefix}/{f}", filter=plain)
        tars += 1
        rec["tar"] = tar.name
        rec["tar_bytes"] = tar.stat().st_size
        if rec["tar_bytes"] > 16 * (1 << 20):
            rec["warning"] = f"{tar.name} is {rec['tar_bytes'] / 2**20:.1f} MiB: over the 16 MiB a file of $OUT may be"
            log("WARNING " + rec["warning"])
        log(
            f"DONE {r['name']}: {s['tokens_per_second']:.0f} tok/s, train {s['train_seconds']:.0f} s, wall {wall:.0f} s "
            f"(estimate {est:.0f}), eval loss {s['eval_loss_before']} -> {s['eval_loss_after']}; {tar.name} "
            f"{rec['tar_bytes'] / 2**20:.1f} MiB"
        )
        write_summary()

    write_summary()
    log(f"finished in {time.time() - a.start:.0f} s of {a.budget:.0f}")
    w = max(len(r["name"]) for r in summary["runs"]) if summary["runs"] else 4
    for rec in summary["runs"]:
        if rec.get("status") in ("done", "stopped_early"):
            print(
                f"  {rec['name']:<{w}}  {rec['status']:<13} {rec['tokens_per_second']:>8.0f} tok/s  train {rec['train_seconds']:>5.0f} s"
                f"  wall {rec['wall_s']:>5.0f} s  eval {rec['eval_loss_before'] or float('nan'):.4f} -> {rec['eval_loss_after'] or float('nan'):.4f}"
            )
        else:
            print(f"  {rec['name']:<{w}}  {rec.get('status', '?'):<13} {rec.get('reason', '')}")


if __name__ == "__main__":
    main()
