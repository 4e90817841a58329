"""LoRA through peft: targets, LongLive lora.pt key mapping (round trip), diffusers-format export, merging, and the
trainer training (and checkpointing) only the adapter."""
import sys

import pytest
import torch

pytest.importorskip("peft")
from diffusers import WanTransformer3DModel  # noqa: E402

from kvpo_kernels.integrations.diffusers import lora  # noqa: E402
from kvpo_kernels.trainer.config import load_config  # noqa: E402
from kvpo_kernels.trainer.loop import Trainer  # noqa: E402

from _tiny_pipeline import LATENT_CHANNELS, TEXT_DIM, randomize_lora, tiny_inputs, to_causal_wan_lora  # noqa: E402
from _trainer_setup import FAST, one_thread  # noqa: E402,F401  (autouse fixture)


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM,
                                 freq_dim=16, ffn_dim=32, num_layers=2).eval()


def forward(model):
    with torch.no_grad():
        return model(*tiny_inputs(), return_dict=False)[0]


def lora_model(seed=0, rank=4, alpha=8):
    model = tiny_transformer(seed)
    lora.add_lora(model, rank, alpha)
    randomize_lora(model, seed)
    return model


def test_default_targets_are_every_block_linear_and_only_the_adapter_trains():
    model = tiny_transformer()
    params = lora.add_lora(model, 4)
    linears = lora.block_linear_names(model)
    assert {"attn1.to_q", "attn1.to_out.0", "attn2.to_k", "ffn.net.0.proj", "ffn.net.2"} <= set(linears)
    assert len(params) == 2 * len(linears) * len(model.blocks)       # lora_A + lora_B per Linear per block
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    # lora_B starts at zero: the adapted model computes the base model
    torch.testing.assert_close(forward(model), forward(tiny_transformer()), rtol=0, atol=0)


def test_bad_lora_arguments_raise_naming_the_key():
    with pytest.raises(ValueError, match="model.lora_targets"):
        lora.add_lora(tiny_transformer(), 4, targets=["attn1.q"])
    with pytest.raises(ValueError, match="model.lora_rank"):
        lora.add_lora(tiny_transformer(), 0)


def test_longlive_lora_round_trip_gives_the_same_forward(tmp_path):
    """A LoRA'd model's adapter in LongLive's format (CausalWanModel peft names under generator_lora) -> our
    mapping -> a fresh model with the same base: identical output."""
    source = lora_model(seed=0)
    expected = forward(source)
    assert not torch.allclose(expected, forward(tiny_transformer(0)))   # the adapter matters
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": to_causal_wan_lora(lora.lora_state_dict(source)), "step": 100}, path)
    fresh = tiny_transformer(0)
    lora.add_lora(fresh, 4, 8)
    lora.load_causal_wan_lora(fresh, str(path))
    torch.testing.assert_close(forward(fresh), expected, rtol=0, atol=0)


def test_lora_mapping_rejects_foreign_keys_and_wrong_rank(tmp_path):
    with pytest.raises(ValueError, match="not LoRA weights"):
        lora.convert_causal_wan_lora_state_dict({"blocks.0.self_attn.q.weight": torch.zeros(1)})
    path = tmp_path / "lora.pt"
    torch.save(to_causal_wan_lora(lora.lora_state_dict(lora_model(rank=4))), path)
    fresh = tiny_transformer()
    lora.add_lora(fresh, 2)
    with pytest.raises(ValueError, match="model.lora_rank"):
        lora.load_causal_wan_lora(fresh, str(path))


def test_exported_adapter_loads_with_diffusers_and_merges(tmp_path):
    source = lora_model(seed=1)
    expected = forward(source)
    path = lora.save_lora_adapter(source, str(tmp_path / "adapter"))
    # diffusers' own loader (what WanPipeline.load_lora_weights calls) on a fresh base model
    fresh = tiny_transformer(1)
    fresh.load_lora_adapter(str(tmp_path / "adapter"), prefix="transformer", weight_name=lora.LORA_WEIGHTS_NAME)
    torch.testing.assert_close(forward(fresh), expected, rtol=1e-6, atol=1e-6)
    # ours reads it back too
    ours = tiny_transformer(1)
    lora.add_lora(ours, 4, 8)
    lora.load_causal_wan_lora(ours, path)
    torch.testing.assert_close(forward(ours), expected, rtol=0, atol=0)
    # merged: a plain model, strict load
    plain = tiny_transformer(5)
    plain.load_state_dict(lora.merged_state_dict(source), strict=True)
    torch.testing.assert_close(forward(plain), expected, rtol=1e-5, atol=1e-5)


def test_trainer_with_lora_trains_and_checkpoints_only_the_adapter(tmp_path):
    config = load_config("tiny", overrides=FAST + [f"run.output_dir={tmp_path}", "model.lora_rank=4",
                                                   "model.lora_export_merged=true"])
    trainer = Trainer(config)
    names = [n for n, p in trainer.transformer.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    count = sum(p.numel() for p in trainer.trainable)
    for copies in (trainer.old, trainer.ref):
        assert sum(t.numel() for t in copies) == count
    assert sum(t.numel() for group in trainer.optimizer.param_groups for t in group["params"]) == count
    trainer.train(steps=1)
    from kvpo_kernels.trainer.checkpoint import list_checkpoints

    state = torch.load(list_checkpoints(str(tmp_path))[-1], weights_only=False)
    assert set(state["model"]) == set(names)
    assert (tmp_path / "lora" / lora.LORA_WEIGHTS_NAME).is_file()
    from safetensors.torch import load_file

    plain = WanTransformer3DModel.from_config(trainer.transformer.config)
    plain.load_state_dict(load_file(tmp_path / "lora" / "merged_transformer.safetensors"), strict=True)
    resumed = Trainer(config)
    assert resumed.resume()
    for a, b in zip(resumed.trainable, trainer.trainable):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lora_without_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)   # import peft now raises ImportError
    with pytest.raises(ImportError, match=r"kvpo_kernels\[models\]"):
        lora.add_lora(tiny_transformer(), 4)
