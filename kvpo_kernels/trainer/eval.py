"""``kvpo-eval RUN_DIR``: score a fixed prompt set with fixed seeds for the initial and the trained weights.

Reads ``RUN_DIR/config.yaml`` (written by kvpo-train), builds the model as the run did (its initial weights: the base
model plus ``model.lora_checkpoint`` or a zero LoRA), generates one video per prompt (the first ``run.eval_prompts``)
and seed (``run.eval_seeds``) and scores it with the run's rewards; then loads the run's newest checkpoint and does
the same. Prints the mean reward per component and the weighted total, with the number of prompts and videos.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

import torch


@torch.no_grad()
def evaluate(trainer) -> Dict[str, float]:
    """Mean reward per component (and ``weighted``) over the eval prompts x seeds, under the current weights."""
    cfg = trainer.config
    count = len(trainer.prompts) if cfg.run.eval_prompts == 0 else min(cfg.run.eval_prompts, len(trainer.prompts))
    frames = cfg.rollout.num_blocks * cfg.streaming.frames_per_block
    channels, height, width = trainer.latent_shape
    dtype = next(trainer.transformer.parameters()).dtype
    scores = []
    for prompt_id in range(count):
        for seed in cfg.run.eval_seeds:
            generator = torch.Generator().manual_seed(int(seed))
            noise = torch.randn(1, channels, frames, height, width, generator=generator)
            devices = [trainer.device] if trainer.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):   # the sampler's re-noising draws: fixed by the seed too
                torch.manual_seed(int(seed))
                latents = trainer.generator.generate(noise.to(trainer.device, dtype),
                                                     trainer.prompts[prompt_id:prompt_id + 1])
            scores.append(trainer.reward_fn(latents, torch.tensor([prompt_id])).double()[0])
    scores = torch.stack(scores)
    out = {name: float(value) for name, value in zip(trainer.reward_fn.names, scores.mean(0))}
    out["weighted"] = float((scores * trainer.component_weights).sum(1).mean())
    out.update(prompts=count, videos=scores.shape[0])
    return out


def evaluate_run(run_dir: str, overrides: Sequence[str] = ()) -> Dict[str, Dict[str, float]]:
    """``{"initial": scores, "trained": scores}`` of the run in ``run_dir`` (see the module docstring)."""
    from .checkpoint import list_checkpoints
    from .config import load_config
    from .errors import InputValueError
    from .loop import Trainer

    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path) or not list_checkpoints(run_dir):
        raise InputValueError(f"RUN_DIR: {run_dir!r} holds no config.yaml and checkpoint (a kvpo-train output dir)")
    config = load_config(path=config_path, overrides=[f"run.output_dir={run_dir}", *overrides])
    trainer = Trainer(config)
    results = {"initial": evaluate(trainer)}
    trainer.resume()
    results["trained"] = evaluate(trainer)
    return results


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    initial, trained = results["initial"], results["trained"]
    names = [k for k in initial if k not in ("prompts", "videos")]
    width = max(len(n) for n in names + ["component"])
    lines = [f"{'component':<{width}}  {'initial':>10}  {'trained':>10}  {'change':>10}"]
    for name in names:
        lines.append(f"{name:<{width}}  {initial[name]:>10.4f}  {trained[name]:>10.4f}  "
                     f"{trained[name] - initial[name]:>+10.4f}")
    lines.append(f"({initial['prompts']} prompts, {initial['videos']} videos: every prompt x seed)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kvpo-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a kvpo-train output directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a field of the run's config, e.g. --set run.eval_prompts=8")
    args = parser.parse_args(argv)
    from .errors import InputError

    try:
        print(format_table(evaluate_run(args.run_dir, args.overrides)), flush=True)
    except InputError as error:
        print(f"kvpo-eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
