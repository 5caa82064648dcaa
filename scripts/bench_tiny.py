#!/usr/bin/env python3
"""Times the README's first run (the `tiny` preset on the CPU) and writes a benchmark record
(scripts/record.py) that `scripts/bench_report` turns into the README's figure.

    cargo build --release -p nsa-train
    python3 scripts/bench_tiny.py --bin target/release/nsa-train --conditions "idle machine" \\
        --json benchmarks/results/$(date +%F)-cpu-tiny.json

The training's own summary gives the tokens/s, the validation loss and the unigram entropy; the
wall time is measured here around the whole process (start-up, tokenising the corpus,
evaluation and checkpoints included).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import write_record  # noqa: E402


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, help="the nsa-train binary")
    p.add_argument("--json", required=True, help="the record to write")
    p.add_argument("--conditions", required=True, help="what else ran on the machine, e.g. 'idle machine'")
    p.add_argument("--steps", type=int, help="override the preset's steps")
    args = p.parse_args()
    version = subprocess.run([args.bin, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"\(([0-9a-f]{7,}(?:-dirty)?)\)", version)
    commit = found.group(1) if found else "unknown"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tiny")
        cmd = [args.bin, "--preset", "tiny", "--backend", "cpu", "--no-tui", "--out", out]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    text = run.stdout + run.stderr
    if run.returncode != 0:
        sys.exit(f"nsa-train failed ({run.returncode}):\n{text[-2000:]}")
    steps = re.search(r"steps \d+\.\.(\d+) of \d+", text)
    tps = re.search(r"([\d,]+) tokens/s\)", text)
    val = re.search(r"validation loss ([\d.]+)", text)
    uni = re.search(r"unigram entropy of the training split: ([\d.]+) nats", text)
    shape = re.search(r"(\d+) steps of (\d+) x (\d+) x (\d+) tokens", text)
    if not (steps and tps and val and uni and shape):
        sys.exit(f"could not read the training summary:\n{text[-2000:]}")
    tokens_per_step = int(shape.group(2)) * int(shape.group(3)) * int(shape.group(4))
    result = dict(
        steps=int(steps.group(1)),
        tokens_per_step=tokens_per_step,
        train_s=wall,
        tokens_per_s=float(tps.group(1).replace(",", "")),
        val_loss=float(val.group(1)),
        unigram_entropy=float(uni.group(1)),
        conditions=args.conditions,
        command=" ".join(cmd[1:]),
    )
    write_record(args.json, "bench_tiny.py", commit, "cpu", cpu_name(),
                 dict(preset="tiny", backend="cpu", steps=args.steps), result)
    print(f"wrote {args.json}: {wall / 60:.1f} min, {result['tokens_per_s']:.0f} tokens/s, "
          f"validation loss {result['val_loss']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
