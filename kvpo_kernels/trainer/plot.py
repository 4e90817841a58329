"""``kvpo-plot METRICS.jsonl -o out.png``: reward, loss, KL and clip fraction of a run, one panel each."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from .metrics import AVERAGED_METRICS

PANELS = tuple((key, label) for key, label in (("reward_mean", "reward (group mean)"), ("loss", "loss"),
                                               ("kl", "KL(pi || pi_ref)"), ("clip_fraction", "clip fraction"))
               if key in AVERAGED_METRICS)  # (a key renamed in metrics.py drops its panel: the tests catch it)


def read_metrics(path: str) -> List[Dict]:
    """The step records of a metrics.jsonl file, in step order, one per step (the last row of a step wins; other
    record kinds and a torn last line are skipped): a plot never runs backwards, even on a file of older runs."""
    by_step = {}
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def plot_metrics(records: Sequence[Dict], out: str, title: Optional[str] = None) -> None:
    """Write a 2x2 PNG of the PANELS over steps; skipped (non-finite) steps are marked with red ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    skipped = [r["step"] for r in records if r.get("skipped")]
    for ax, (key, label) in zip(axes.flat, PANELS):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, lw=1.2)
            if len(values) >= 10:  # a running mean makes the trend readable through rollout noise
                width = max(5, len(values) // 10)
                smooth = [sum(values[max(0, i - width + 1):i + 1]) / len(values[max(0, i - width + 1):i + 1])
                          for i in range(len(values))]
                ax.plot(steps, smooth, lw=2.0, color="black", alpha=0.7, label=f"mean of {width}")
                ax.legend(loc="best", fontsize=8)
        for step in skipped:
            ax.axvline(step, color="red", lw=0.6, alpha=0.5)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kvpo-plot", description=__doc__)
    parser.add_argument("metrics", help="metrics.jsonl written by kvpo-train")
    parser.add_argument("-o", "--output", default=None, help="PNG path (default: next to the metrics, .png)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    out = args.output or args.metrics.rsplit(".", 1)[0] + ".png"
    if not os.path.isfile(args.metrics):
        print(f"kvpo-plot: error: {args.metrics}: no such file", file=sys.stderr)
        return 2
    records = read_metrics(args.metrics)
    if not records:
        print(f"kvpo-plot: error: {args.metrics}: holds no step records", file=sys.stderr)
        return 2
    plot_metrics(records, out, title=args.title)
    print(f"wrote {out} ({len(records)} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
