#!/usr/bin/env python3
"""Plots a `v3c train` run: loss and max/mean expert load per step (from RUN/loss.csv) into a PNG.

    python3 scripts/plot_training.py RUN_DIR OUT.png [--title TEXT]

Needs matplotlib (`pip install matplotlib`); the build and the tests never run it. The README's figure
(docs/training-tiny.png) comes from the run described in its caption.
"""
import argparse
import csv
import sys


def moving_average(values, width):
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1):i + 1]
        out.append(sum(window) / len(window))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="directory written by v3c train (holds loss.csv)")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--title", default="", help="figure title")
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_training: matplotlib is not installed (pip install matplotlib)")
    try:
        rows = list(csv.DictReader(open(f"{a.run}/loss.csv")))
    except OSError as e:
        sys.exit(f"plot_training: {a.run}/loss.csv: {e.strerror}")
    if not rows:
        sys.exit(f"plot_training: {a.run}/loss.csv has no steps")
    step = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    load = [float(r["max_mean_expert_load"]) for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    top.plot(step, loss, color="tab:blue", linewidth=1)
    top.set_yscale("log")
    top.set_ylabel("training loss (log)")
    top.grid(alpha=0.3)
    bottom.plot(step, load, color="tab:orange", alpha=0.35, linewidth=1, label="per step")
    bottom.plot(step, moving_average(load, 20), color="tab:orange", linewidth=2, label="20-step mean")
    bottom.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    bottom.set_ylabel("max / mean expert load")
    bottom.set_xlabel("step")
    bottom.legend(loc="upper right")
    bottom.grid(alpha=0.3)
    if a.title:
        fig.suptitle(a.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(f"plot_training: wrote {a.out} ({len(rows)} steps: loss {loss[0]:.3f} -> {loss[-1]:.3f}, "
          f"max/mean load {sum(load[:20]) / min(20, len(load)):.2f} -> {sum(load[-20:]) / min(20, len(load)):.2f} "
          f"over the first/last 20 steps)")


if __name__ == "__main__":
    main()
