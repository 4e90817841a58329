"""``kvpo-train --preset tiny | --config FILE [--set section.key=value ...]``: run KVPO training.

Single process, or several under torchrun (``torchrun --nproc_per_node=N -m kvpo_kernels.trainer.cli ...``;
NCCL on GPUs, gloo on CPU). Writes ``metrics.jsonl``, ``config.yaml``, ``checkpoint-<step>.pt`` (+ ``.sha256``, the
newest two kept) and ``metrics.png`` to ``run.output_dir`` and prints the first and last reward. A wrong input
(config, file, argument) prints one ``kvpo-train: error: ...`` line and exits 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from .config import PRESETS, load_config
from .errors import InputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpo-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a built-in configuration")
    source.add_argument("--config", metavar="FILE", help="YAML config (may name a preset to start from)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field, e.g. --set run.steps=20 (repeatable; values parsed as YAML)")
    parser.add_argument("--steps", type=int, help="shorthand for --set run.steps=N")
    parser.add_argument("--output-dir", help="shorthand for --set run.output_dir=DIR")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: an earlier run's files in the output dir move to previous-<time>/")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though the config differs from the checkpoint's; the changes are applied "
                             "(optimizer hyper-parameters included) and logged in metrics.jsonl")
    parser.add_argument("--eval-only", action="store_true",
                        help="no training: score the run in the output dir (initial vs trained), as kvpo-eval does")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0 when done, 2 on a wrong input (config, file, argument, reward): one line on stderr, no traceback."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except InputError as error:
        print(f"kvpo-train: error: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.output_dir is not None:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.fresh:
        overrides.append("run.resume=false")
    config = load_config(preset=args.preset, path=args.config, overrides=overrides)
    if args.eval_only:
        from .eval import evaluate_run, format_table

        print(format_table(evaluate_run(config.run.output_dir, overrides)), flush=True)
        return 0

    from .distributed import DistInfo, cleanup, init_distributed
    from .loop import Trainer
    from .model import check_startup, plan_memory, resolve_device

    plan = plan_memory(config)   # meta tensors: nothing allocated; refuses before any process group or model
    check_startup(config, resolve_device(config.run.device, DistInfo()), plan)
    print(f"kvpo-train: {plan.format()}", flush=True)
    dist = init_distributed(config.run.device)
    if config.run.cpu_threads > 0 and not (config.run.device != "cpu" and _has_cuda()):
        import torch

        torch.set_num_threads(config.run.cpu_threads)
    try:
        started = time.time()
        trainer = Trainer(config, dist=dist, allow_config_change=args.allow_config_change)
        if dist.is_main:
            params = sum(p.numel() for p in trainer.transformer.parameters())
            print(f"kvpo-train: {params / 1e6:.2f}M-parameter Wan transformer on {trainer.device}, "
                  f"{config.rollout.num_branches} branches + anchor per group, {config.rollout.groups_per_step} "
                  f"group(s) per step over {dist.world_size} rank(s), {config.run.steps} steps -> "
                  f"{config.run.output_dir}", flush=True)
        records = trainer.train()
        if dist.is_main:
            _report(records, config, time.time() - started)
    finally:
        cleanup(dist)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _report(records, config, seconds: float) -> None:
    """First and last reward of this call's steps, naming the steps they cover."""
    rewarded = [(r["step"], r["reward_mean"]) for r in records if r.get("reward_mean") is not None]
    skipped = sum(1 for r in records if r.get("skipped"))
    if not rewarded:
        print("kvpo-train: nothing to do (already at run.steps; pass --fresh to start over)")
        return
    steps, rewards = zip(*rewarded)
    window = max(1, len(rewards) // 10)
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    print(f"first reward {rewards[0]:.4f} (step {steps[0]})  last reward {rewards[-1]:.4f} (step {steps[-1]})  "
          f"(mean of steps {steps[0]}-{steps[window - 1]} {first:.4f} -> steps {steps[-window]}-{steps[-1]} "
          f"{last:.4f}, {'+' if last >= first else ''}{last - first:.4f})")
    print(f"{len(records)} steps in {seconds:.0f} s ({skipped} skipped); metrics: "
          f"{os.path.join(config.run.output_dir, 'metrics.jsonl')}")
    if config.run.plot:
        from .plot import plot_metrics, read_metrics

        out = os.path.join(config.run.output_dir, "metrics.png")
        plot_metrics(read_metrics(os.path.join(config.run.output_dir, "metrics.jsonl")), out,
                     title="kvpo-train " + os.path.basename(os.path.normpath(config.run.output_dir)))
        print(f"plot: {out}")


if __name__ == "__main__":
    sys.exit(main())
