"""Turn pytest-benchmark JSON files (one run) into a Markdown report, a PNG plot and a short printed summary.

    python benchmarks/summarize.py results.json [more.json ...] --markdown results.md --plot results.png \\
        [--short] [--note "machine shared with other jobs"]

Rows come from each benchmark's ``extra_info`` (written by benchmarks/conftest.py ``record``). A benchmark family
is the first word of its group (``routed_attention``, ``velocity_energy``, ``group_rollout``); the report and the
plot have one section / one row of panels per family:
- left panel: the headline, our speedup over each peer (peer time / our time; higher is better; 1x dashed), with
  the min-max range of the per-round ratios as an error bar where the benchmark measured paired rounds;
- right panel: every provider's median time per call (ms, log scale; lower is better).
Each row names its thread count. The header holds the run's library version, git commit, device, CPU, torch /
CUDA / cuDNN / Triton / Python versions and date (from ``machine_info.kvpo``). ``--short`` prints a few lines per
family (our rows, their speedups and cross-check errors), small enough for a GPU run's 12,000-character output.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

OURS = ("routed", "routed_tma", "triton", "cuda", "cpu", "batched")
CEILINGS = ("copy",)  # not a competitor: the bandwidth ceiling, reported as copy_fraction
RUN_KEYS = ("kvpo_kernels", "git_commit", "device", "cpu", "torch", "cuda", "cudnn", "triton", "python", "date",
            "load_average", "dry_run")
THROUGHPUT = ("TFLOP/s", "GB/s")


def load(path: Path) -> Tuple[List[dict], dict]:
    """(rows, run info) of one pytest-benchmark JSON file."""
    data = json.loads(path.read_text())
    run = dict(data.get("machine_info", {}).get("kvpo", {}))
    run.setdefault("date", data.get("datetime", ""))
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        group = bench.get("group") or bench["name"].split("[")[0].replace("test_", "")
        row = dict(info, group=group, name=bench["name"], family=group.split()[0])
        row.setdefault("median_ms", bench["stats"]["median"] * 1e3)
        row.setdefault("provider", bench.get("param") or bench["name"])
        row["case"] = " ".join(group.split()[1:]) or row["provider"]
        rows.append(row)
    return rows, run


def families(rows: List[dict]) -> "OrderedDict[str, List[dict]]":
    grouped: "OrderedDict[str, List[dict]]" = OrderedDict()
    for row in rows:
        grouped.setdefault(row["family"], []).append(row)
    return grouped


def speedups(row: dict) -> List[Tuple[str, float, Optional[float], Optional[float]]]:
    """(peer, median speedup, min, max) of one of our rows against every peer that is neither ours nor a ceiling."""
    out = []
    for key, value in row.items():
        if not key.startswith("speedup_vs_") or key.endswith(("_min", "_median", "_max")):
            continue
        peer = key[len("speedup_vs_"):]
        if peer in OURS or peer in CEILINGS:
            continue
        spread_mid = row.get(f"{key}_median")
        out.append((peer, spread_mid if spread_mid is not None else value, row.get(f"{key}_min"),
                    row.get(f"{key}_max")))
    return out


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def _speedup_text(entry) -> str:
    peer, mid, low, high = entry
    spread = f" [{low:.2f}-{high:.2f}]" if low is not None and high is not None else ""
    return f"{mid:.2f}x vs {peer}{spread}"


def header(run: dict, count: int, note: str) -> str:
    lines = [f"Run: {count} benchmarks; " + "; ".join(f"{key} {run[key]}" for key in RUN_KEYS if key in run)]
    if note:
        lines.append(f"Note: {note}")
    lines.append("Speedup = peer time / our time (higher is better); [a-b] = min-max over paired rounds. Times are "
                 "medians per call (lower is better). gather+* peers' times include the per-branch K/V gather.")
    return "\n\n".join(lines)


def markdown(rows: List[dict], run: dict, note: str = "") -> str:
    parts = [header(run, len(rows), note)]
    for family, members in families(rows).items():
        throughput = next((key for key in THROUGHPUT if any(key in row for row in members)), None)
        columns = ["case", "provider", "threads", "median_ms"] + ([throughput] if throughput else [])
        extra = [key for key in ("launch_us", "copy_fraction", "peak_extra_MB", "kv_memory_ratio", "autotune")
                 if any(key in row for row in members)]
        lines = [f"### {family}", "", "| " + " | ".join(columns + extra + ["speedups (ours)", "max err"]) + " |",
                 "|" + " --- |" * (len(columns) + len(extra) + 2)]
        for row in members:
            errors = [value for key, value in row.items() if key.startswith("err_")]
            cells = [_fmt(row.get(col)) for col in columns + extra]
            cells.append("; ".join(_speedup_text(s) for s in speedups(row)) if row["provider"] in OURS else "")
            cells.append(f"{max(errors):.2g}" if errors else "")
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def short_summary(rows: List[dict], run: dict, limit: int = 4000) -> str:
    """A few lines per family: our rows with speedups; total length capped at ``limit`` characters."""
    lines = [f"{run.get('device', '?')} | kvpo {run.get('kvpo_kernels', '?')} @ {run.get('git_commit', '?')} | "
             f"torch {run.get('torch', '?')} triton {run.get('triton', '?')}"]
    for family, members in families(rows).items():
        ours = [row for row in members if row["provider"] in OURS]
        lines.append(f"{family}: {len(members)} rows, {len(ours)} ours")
        for row in ours:
            errors = [value for key, value in row.items() if key.startswith("err_")]
            err = f" err<={max(errors):.1g}" if errors else ""
            tuned = f" autotune={row['autotune']}" if "autotune" in row else ""
            lines.append(f"  {row['case']} {row['provider']}{tuned}: {row['median_ms']:.3g} ms{err}; "
                         + "; ".join(_speedup_text(s) for s in speedups(row)))
    text = "\n".join(lines)
    return text if len(text) <= limit else text[:limit - 20] + "\n... (truncated)"


def _row_label(row: dict) -> str:
    tuned = f", autotune {row['autotune']}" if row["provider"] in OURS and "autotune" in row else ""
    return f"{row['case']}\n({row.get('threads', '?')} thr{tuned})"


def _unique(labels: List[str]) -> List[str]:
    """Bar labels made unique (matplotlib merges bars with equal category names)."""
    seen: Dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def plot(rows: List[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = families(rows)
    heights = [max(2.2, 0.45 * max(len(m), 1) + 1.2) for m in grouped.values()]
    fig, axes = plt.subplots(len(grouped), 2, figsize=(13, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    for (family, members), (ax_speed, ax_time) in zip(grouped.items(), axes):
        _plot_speedups(ax_speed, family, members)
        _plot_times(ax_time, family, members)
    fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_speedups(ax, family: str, members: List[dict]) -> None:
    bars = [(f"{_row_label(row)} {row['provider']} vs {peer}", mid, low, high)
            for row in members if row["provider"] in OURS for peer, mid, low, high in speedups(row)]
    ax.set_title(f"{family}: our speedup (higher is better)", fontsize=9)
    ax.set_xlabel("speedup = peer time / our time (x)")
    if not bars:
        ax.text(0.5, 0.5, "no row of ours with a peer in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        return
    labels, mids = _unique([b[0] for b in bars]), [b[1] for b in bars]
    low_err = [mid - low if low is not None else 0 for _, mid, low, _ in bars]
    high_err = [high - mid if high is not None else 0 for _, mid, _, high in bars]
    colors = ["tab:green" if mid >= 1 else "tab:red" for mid in mids]
    ax.barh(labels, mids, xerr=[low_err, high_err], color=colors, capsize=2)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
    if max(mids) / max(min(mids), 1e-9) > 20:
        ax.set_xscale("log")
    for y, (_, mid, _, high) in enumerate(bars):  # the value right of the bar and of its error bar
        ax.text(max(mid, high or mid), y, f"  {mid:.2f}x", va="center", fontsize=7)
    ax.set_xlim(right=max(high or mid for _, mid, _, high in bars) * (3 if ax.get_xscale() == "log" else 1.25))
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)


def _plot_times(ax, family: str, members: List[dict]) -> None:
    from matplotlib.ticker import NullFormatter

    labels = _unique([f"{_row_label(row)} {row['provider']}" for row in members])
    colors = ["tab:blue" if row["provider"] in OURS else "tab:gray" for row in members]
    ax.barh(labels, [row["median_ms"] for row in members], color=colors)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor log ticks unlabelled: their labels collide
    ax.set_title(f"{family}: time per call (lower is better)", fontsize=9)
    ax.set_xlabel("median ms per call (log); blue = ours")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark --benchmark-json files (one run)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--short", action="store_true", help="print the short summary instead of the table")
    parser.add_argument("--note", default="", help="a line for the report (e.g. what else loaded the machine)")
    args = parser.parse_args(argv)
    rows, run = [], {}
    for path in args.json:
        if not path.is_file():
            parser.error(f"no such results file: {path}")
        file_rows, file_run = load(path)
        rows += file_rows
        run = run or file_run
    report = markdown(rows, run, args.note)
    if args.markdown:
        args.markdown.write_text(report)
    if args.plot and rows:
        dry = " - DRY RUN (CPU stand-ins for the GPU cases)" if run.get("dry_run") == "True" else ""
        plot(rows, args.plot, f"kvpo_kernels {run.get('kvpo_kernels', '?')} @ {run.get('git_commit', '?')} on "
                              f"{run.get('device', '?')} ({run.get('date', '')}){dry}")
    if args.short:
        print(short_summary(rows, run))
    elif not args.markdown:
        print(report)


if __name__ == "__main__":
    main()
