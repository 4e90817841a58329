"""The real model stack on CPU with tiny random models saved in the real formats: UMT5 prompts (as WanPipeline
encodes them, cached), the Wan VAE decoder, the CLIP reward, the memory plan and start-up refusal, and the
"Train your LongLive checkpoint" commands (configs/longlive_kvpo.yaml) end to end, offline."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("imageio_ffmpeg")

from kvpo_kernels.integrations.diffusers import lora, text, vae as vae_module  # noqa: E402
from kvpo_kernels.trainer import cli, eval as eval_cli  # noqa: E402
from kvpo_kernels.trainer.config import load_config  # noqa: E402
from kvpo_kernels.trainer.model import plan_memory  # noqa: E402
from kvpo_kernels.trainer.rewards import CombinedReward  # noqa: E402

import _tiny_pipeline as tiny  # noqa: E402
from _trainer_setup import FAST, one_thread  # noqa: E402,F401  (autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"wan": tiny.build_wan_folder(root / "wan"), "clip": tiny.build_clip_folder(root / "clip"),
            "prompts": tiny.write_prompts(root / "prompts.txt")}


def test_prompt_embeds_match_the_wan_pipeline(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer, encoder = text.load_text_encoder(folders["wan"], "cpu", torch.float32)
    ours = text.encode_prompts(tiny.SENTENCES[:3], tokenizer, encoder, max_length=16, batch_size=2)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=None, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler())
    expected = pipe._get_t5_prompt_embeds(tiny.SENTENCES[:3], max_sequence_length=16, device="cpu",
                                          dtype=torch.float32)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert (ours[:, -1] == 0).all() and (ours[:, 0] != 0).any()   # zero padding past the prompt


def test_prompt_cache_is_reused_and_keyed_by_the_prompts(folders, tmp_path, monkeypatch):
    first = text.cached_prompt_embeds(tiny.SENTENCES[:2], folders["wan"], str(tmp_path), device="cpu",
                                      dtype=torch.float32, max_length=16)
    calls = []
    real = text.load_text_encoder
    monkeypatch.setattr(text, "load_text_encoder", lambda *a: (calls.append(a), real(*a))[1])
    again = text.cached_prompt_embeds(tiny.SENTENCES[:2], folders["wan"], str(tmp_path), device="cpu",
                                      dtype=torch.float32, max_length=16)
    assert not calls and torch.equal(first, again)
    other = text.cached_prompt_embeds(tiny.SENTENCES[1:3], folders["wan"], str(tmp_path), device="cpu",
                                      dtype=torch.float32, max_length=16)
    assert len(calls) == 1 and other.shape == first.shape and len(os.listdir(tmp_path)) == 2


def test_the_text_encoder_is_freed_after_encoding(folders, tmp_path, monkeypatch):
    import gc
    import weakref

    refs, real = [], text.load_text_encoder
    monkeypatch.setattr(text, "load_text_encoder",
                        lambda *a: (lambda pair: (refs.append(weakref.ref(pair[1])), pair)[1])(real(*a)))
    text.cached_prompt_embeds(tiny.SENTENCES[:1], folders["wan"], str(tmp_path), device="cpu", dtype=torch.float32,
                              max_length=16)
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None


def test_vae_decoder_unnormalises_as_the_pipeline_and_decodes_in_chunks(folders):
    model = vae_module.load_wan_vae(folders["wan"])
    latents = torch.randn(3, tiny.LATENT_CHANNELS, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    video = vae_module.WanLatentDecoder(model, device="cpu", batch_size=2)(latents)
    # WanPipeline.__call__: latents / (1 / latents_std) + latents_mean, then vae.decode
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = model.decode(latents / inv_std + mean, return_dict=False)[0].clamp(-1, 1)
    assert video.shape == (3, 3, 1 + 4 * 2, 32, 32)
    torch.testing.assert_close(video, expected, rtol=1e-5, atol=1e-5)


def test_clip_reward_is_the_cosine_of_clip_embeddings_averaged_over_frames(folders):
    from transformers import CLIPModel, CLIPProcessor

    from kvpo_kernels.trainer.learned_rewards import ClipScoreReward, sample_frames

    reward = ClipScoreReward(folders["clip"], tiny.SENTENCES, num_frames=3)
    video = torch.rand(2, 3, 9, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = torch.tensor([3, 0])
    scores = reward(video, ids)
    model, processor = CLIPModel.from_pretrained(folders["clip"]), CLIPProcessor.from_pretrained(folders["clip"])
    for n in range(2):
        frames = list((sample_frames(video[n:n + 1], 3)[0] + 1) / 2)
        inputs = processor(text=[tiny.SENTENCES[ids[n]]], images=frames, return_tensors="pt", padding=True,
                           do_rescale=False)
        with torch.no_grad():
            cosine = model(**inputs).logits_per_image[:, 0] / model.logit_scale.exp()
        torch.testing.assert_close(scores[n, 0], cosine.mean(), rtol=1e-4, atol=1e-5)


def test_pixel_components_share_one_decode_per_call():
    class Pixels:
        input = "pixels"

        def __init__(self, name):
            self.names = (name,)

        def __call__(self, video, ids):
            return video.mean(dim=(1, 2, 3, 4)).unsqueeze(1)

    decodes = []

    class Decoder:
        def __call__(self, latents):
            decodes.append(latents.shape)
            return latents[:, :3].repeat_interleave(4, dim=2)[:, :, 3:]   # 1 + 4 (F - 1) frames

    reward = CombinedReward([Pixels("a"), Pixels("b")], Decoder())
    video = torch.randn(3, 4, 5, 2, 2)
    scores = reward(video, torch.zeros(3, dtype=torch.long))
    assert len(decodes) == 1 and scores.shape == (3, 2)
    pixels = Decoder()(video)
    torch.testing.assert_close(scores[:, 0], pixels.mean(dim=(1, 2, 3, 4)).double())
    with pytest.raises(ValueError, match="need a VAE"):
        CombinedReward([Pixels("a")], None)


def test_memory_plan_counts_what_the_trainer_builds(tmp_path):
    from kvpo_kernels.trainer.loop import Trainer

    config = load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}", "model.lora_rank=4"])
    plan = plan_memory(config)
    trainer = Trainer(config)
    assert plan.params == sum(p.numel() for p in trainer.transformer.parameters())
    assert plan.trainable == sum(p.numel() for p in trainer.trainable)
    assert plan.optimizer_bytes == 2 * 4 * plan.trainable                       # fp32 AdamW moments
    assert plan.copies_bytes == 3 * 4 * plan.trainable                          # old + reference + EMA (0.999)
    big = plan_memory(load_config("wan1.3b"))                                   # meta tensors: instant, no memory
    assert 1.3e9 < big.params - big.trainable < 1.5e9 and big.kv_pool_bytes > 0 and "planned memory" in big.format()


def test_the_wan_preset_refuses_to_start_without_weights_prompts_or_gpu(monkeypatch, capsys):
    from kvpo_kernels.trainer import loop

    monkeypatch.setattr(loop.Trainer, "__init__", lambda *a, **k: pytest.fail("built a model"))
    assert cli.main(["--preset", "wan1.3b"]) == 2
    err = capsys.readouterr().err
    for missing in ("model.pretrained", "model.causal_checkpoint", "rollout.prompts_file", "needs CUDA"):
        assert missing in err


def test_tiny_preset_needs_none_of_the_models_extra(tmp_path, monkeypatch):
    from kvpo_kernels.trainer.loop import Trainer

    for name in ("peft", "transformers", "imageio", "imageio_ffmpeg"):
        monkeypatch.setitem(sys.modules, name, None)
    records = Trainer(load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}"])).train(steps=1)
    assert math.isfinite(records[0]["reward_mean"])


def _longlive_overrides(folders, run_dir, lora_file):
    """configs/longlive_kvpo.yaml's paths pointed at the tiny folder, and its geometry shrunk to it."""
    return [f"model.pretrained={folders['wan']}", "model.causal_checkpoint=null", "model.lora_rank=4",
            "model.lora_alpha=4", f"model.lora_checkpoint={lora_file}", "model.dtype=float32",
            "model.gradient_checkpointing=false", f"rollout.prompts_file={folders['prompts']}",
            f"reward.components=[{{name: clip, weight: 1.0, path: {folders['clip']}, num_frames: 3}}]",
            "streaming.frames_per_block=1", "streaming.sink_frames=1", "streaming.window_frames=5",
            "streaming.nearest_frames=2", "streaming.cache_frames=8", "rollout.num_blocks=6", "rollout.fork_min=5",
            "rollout.fork_max=5", "rollout.perturbed_blocks=1", "rollout.num_branches=2",
            "rollout.latent_height=8", "rollout.latent_width=8", "rollout.prompt_length=16", "run.steps=2",
            "run.sample_every=1", "run.checkpoint_every=0", "run.device=cpu", f"run.output_dir={run_dir}",
            "run.eval_prompts=2", "run.eval_seeds=[0]", "optim.lr=1e-3", "optim.ema_decay=0",
            "optim.warmup_steps=0", "rollout.groups_per_step=1", "rollout.streaming_chunk_size=0",
            "rollout.perturb_within_first_x_chunks=0"] + FAST


def _run(module, args):
    env = {**os.environ, **OFFLINE, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "KVPO_BACKEND": "torch"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("config_file", ["configs/longlive_kvpo.yaml", "configs/memflow_kvpo.yaml"])
def test_commands_end_to_end_on_a_tiny_wan_folder(config_file, folders, tmp_path, monkeypatch, capsys):
    """kvpo-train --config configs/{longlive,memflow}_kvpo.yaml (a LongLive / MemFlow lora.pt: both are peft state
    dicts in CausalWanModel names under "generator_lora"; UMT5 prompts, VAE-decoded CLIP reward, sample videos),
    then kvpo-eval, offline: the adapter loads back into a fresh model with diffusers, the mp4s decode with the
    right frames and size, the rewards are finite. MemFlow runs with its bank (records at blocks 0 and 3)."""
    import imageio
    import numpy
    from diffusers import WanTransformer3DModel

    base = WanTransformer3DModel.from_pretrained(folders["wan"], subfolder="transformer").eval()
    lora.add_lora(base, 4, 4)
    tiny.randomize_lora(base, seed=3)
    lora_file = tmp_path / "lora.pt"
    torch.save({"generator_lora": tiny.to_causal_wan_lora(lora.lora_state_dict(base))}, lora_file)
    run_dir = tmp_path / "run"
    overrides = _longlive_overrides(folders, run_dir, lora_file)
    if "memflow" in config_file:  # the released layout routes window - nearest slots: fewer fit the tiny pool
        overrides.append("rollout.num_routed=2")
    sets = [arg for item in overrides for arg in ("--set", item)]
    out = _run("kvpo_kernels.trainer.cli", ["--config", config_file, *sets])
    assert "planned memory" in out

    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"event"' not in line]
    assert len(rows) == 2 and all(math.isfinite(r["reward_mean"]) and math.isfinite(r["sample_reward_best"])
                                  for r in rows)
    for step in (1, 2):
        frames = numpy.stack(imageio.mimread(run_dir / "samples" / f"step_{step:06d}.mp4", format="FFMPEG",
                                             memtest=False))
        assert frames.shape == (1 + 4 * (6 - 1), 8 * 8, 3 * 8 * 8, 3)     # anchor | best | worst, 21 frames
    from kvpo_kernels.trainer.checkpoint import list_checkpoints

    state = torch.load(list_checkpoints(str(run_dir))[-1], weights_only=False)
    assert set(state["model"]) and all(".lora_" in name for name in state["model"])
    # the exported adapter, loaded by diffusers into a fresh model, is the trained one
    fresh = WanTransformer3DModel.from_pretrained(folders["wan"], subfolder="transformer").eval()
    fresh.load_lora_adapter(str(run_dir / "lora"), prefix="transformer", weight_name=lora.LORA_WEIGHTS_NAME)
    trained = WanTransformer3DModel.from_pretrained(folders["wan"], subfolder="transformer").eval()
    lora.add_lora(trained, 4, 4)
    with torch.no_grad():
        params = dict(trained.named_parameters())
        for name, tensor in state["model"].items():
            params[name].copy_(tensor)
    with torch.no_grad():
        expected = trained(*tiny.tiny_inputs(), return_dict=False)[0]
        torch.testing.assert_close(fresh(*tiny.tiny_inputs(), return_dict=False)[0], expected, rtol=1e-5,
                                   atol=1e-6)
        assert not torch.allclose(base(*tiny.tiny_inputs(), return_dict=False)[0], expected)  # it trained

    # kvpo-eval RUN_DIR (in process: a second interpreter start costs ~10 s on a loaded 2-core machine)
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    assert eval_cli.main([str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "clip" in table and "weighted" in table and "(2 prompts, 2 videos" in table


def test_custom_learned_reward_example_runs(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("custom_learned_reward",
                                                  os.path.join(ROOT, "examples", "custom_learned_reward.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setenv("KVPO_BACKEND", "torch")
    records = example.main(steps=1, output_dir=str(tmp_path))
    assert math.isfinite(records[0]["reward_mean"])


def test_kvpo_train_eval_only_prints_the_table(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["--preset", "tiny", "--output-dir", run, *[a for item in FAST + ["run.eval_prompts=2"]
                                                       for a in ("--set", item)]]
    assert cli.main([*args, "--steps", "1"]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--eval-only"]) == 0
    table = capsys.readouterr().out
    assert "brightness" in table and "(2 prompts, 4 videos" in table


def test_a_missing_pretrained_folder_is_one_input_error(tmp_path, capsys):
    assert cli.main(["--preset", "tiny", "--set", f"model.pretrained={tmp_path / 'nowhere'}"]) == 2
    assert "model.pretrained" in capsys.readouterr().err
