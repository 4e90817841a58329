"""Turn a pytest-benchmark JSON file into a Markdown table and a PNG plot.

    python benchmarks/summarize.py results.json [more.json ...] --markdown results.md --plot results.png

Each benchmark's ``extra_info`` (GB/s or TFLOP/s, ratios to the peers measured in the same run, device name) becomes
columns; the median time is always shown. Rows keep the file's order, grouped by pytest-benchmark group.
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path


def load_rows(path: Path):
    data = json.loads(path.read_text())
    machine = data.get("machine_info", {})
    rows = []
    for bench in data.get("benchmarks", []):
        row = OrderedDict(group=bench.get("group") or "", name=bench["name"],
                          median_ms=bench["stats"]["median"] * 1e3)
        row.update(bench.get("extra_info", {}))
        rows.append(row)
    return rows, machine, data.get("datetime", "")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


# The columns a reader compares; everything else a benchmark records stays in the JSON.
_HEADLINE = ("group", "name", "median_ms", "GB/s", "copy_fraction", "traffic_copy_fraction", "TFLOP/s", "peak_extra_MB",
             "kv_memory_ratio")


def markdown_table(rows) -> str:
    present = OrderedDict.fromkeys(key for row in rows for key in row)
    columns = [key for key in _HEADLINE if key in present]
    columns += [key for key in present if key.startswith("speedup_vs_")]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(col, "")) for col in columns) + " |")
    return "\n".join(lines)


def plot(rows, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = OrderedDict()
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.2 + 0.35 * len(rows)), squeeze=False)
    for ax, (group, members) in zip(axes[:, 0], groups.items()):
        names = [row["name"].replace("test_", "") for row in members]
        # Throughput when the benchmark recorded it, else the median time.
        metric = next((key for key in ("TFLOP/s", "GB/s") if all(key in row for row in members)), "median_ms")
        ax.barh(names, [row[metric] for row in members], color="tab:blue")
        ax.set_xlabel(metric)
        ax.set_title(group or "benchmarks", fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark --benchmark-json files (one run)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    rows, machine, when = [], {}, ""
    for path in args.json:
        file_rows, machine, when = load_rows(path)
        rows += file_rows
    device = next((row["device"] for row in rows if "device" in row), machine.get("cpu", {}).get("brand_raw", "?"))
    header = f"Device: {device}; run {when}; {len(rows)} benchmarks (median times).\n\n"
    table = header + markdown_table(rows) + "\n"
    if args.markdown:
        args.markdown.write_text(table)
    else:
        print(table)
    if args.plot and rows:
        plot(rows, args.plot, f"kvpo_kernels benchmarks on {device}")


if __name__ == "__main__":
    main()
