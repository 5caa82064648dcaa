#!/usr/bin/env python3
"""Loss curves of several nsa-train runs in one plot, and the final validation losses.

    python3 scripts/plot_quality.py --out curves.png --title "seq 1024" \
        dense=full-metrics.csv nsa=nsa-metrics.csv dsa=dsa-metrics.csv

Each run is LABEL=metrics.csv (nsa-train's `metrics.csv`). The plot shows the validation loss
(points and lines) and the training loss (a running mean over 25 steps, thin) against the
optimizer step. The table (stdout, markdown) gives each run's last validation loss, its step
and tokens, and its relative gap to every other run's validation loss at the same step. Needs
matplotlib (`pip install matplotlib`).
"""

import argparse
import csv
import sys


def read(path):
    train, val = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step, loss = int(row["step"]), float(row["loss"])
            if row["split"] == "train":
                train.append((step, loss))
            elif row["split"] == "val":
                val.append((step, loss, int(row["tokens_seen"] or 0)))
    return train, val


def running_mean(points, width):
    out, acc = [], []
    for step, loss in points:
        acc.append(loss)
        if len(acc) > width:
            acc.pop(0)
        out.append((step, sum(acc) / len(acc)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=metrics.csv")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        if "=" not in spec:
            sys.exit(f"{spec}: expected LABEL=metrics.csv")
        label, path = spec.split("=", 1)
        train, val = read(path)
        if not val:
            sys.exit(f"{path}: no validation rows")
        runs.append((label, train, val))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, (label, train, val) in enumerate(runs):
        color = f"C{i}"
        smooth = running_mean(train, 25)
        ax.plot([s for s, _ in smooth], [l for _, l in smooth], color=color, lw=0.6, alpha=0.5)
        ax.plot([s for s, _, _ in val], [l for _, l, _ in val], "o-", color=color, ms=3,
                label=f"{label} (val)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    lows = [l for _, _, val in runs for _, l, _ in val]
    ax.set_ylim(min(lows) - 0.2, min(lows) + 2.5)
    fig.tight_layout()
    fig.savefig(args.out)

    names = [label for label, _, _ in runs]
    print("| run | step | tokens | val loss | " + " | ".join(f"vs {n}" for n in names) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(names))
    for label, _, val in runs:
        step, loss, tokens = val[-1]
        gaps = []
        for other, _, oval in runs:
            at = {s: l for s, l, _ in oval}
            gaps.append(f"{100 * (loss / at[step] - 1):+.2f} %" if step in at else "-")
        print(f"| {label} | {step} | {tokens:,} | {loss:.4f} | " + " | ".join(gaps) + " |")


if __name__ == "__main__":
    main()
