"""A tiny random Wan "pipeline folder" in the real layout (transformer/, vae/, text_encoder/, tokenizer/, all saved
with save_pretrained) and a tiny random CLIP folder, built locally: nothing is downloaded."""
import json
import os

import torch

SENTENCES = ["a red fox runs through the snow", "a city street at night with neon lights",
             "waves crash on a rocky beach", "a cat sleeps on a sunny window sill",
             "a timelapse of clouds over green mountains"]
LATENT_CHANNELS, TEXT_DIM = 4, 16


def _bpe_files(directory):
    """vocab.json + merges.txt of a byte-level BPE trained on SENTENCES (CLIP's tokenizer format)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    tok.model.save(directory)
    return os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")


def _umt5_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def build_wan_folder(root, *, num_layers=2, seed=0):
    """Writes ``root/{transformer,vae,text_encoder,tokenizer}``; returns root."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                          in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=16,
                          ffn_dim=32, num_layers=num_layers).save_pretrained(os.path.join(root, "transformer"))
    AutoencoderKLWan(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                     latents_std=[1.5, 0.5, 2.0, 1.0]).save_pretrained(os.path.join(root, "vae"))
    tokenizer = _umt5_tokenizer(os.path.join(root, "tokenizer"))
    config = UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(config).save_pretrained(os.path.join(root, "text_encoder"))
    return str(root)


def build_clip_folder(root, seed=0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    os.makedirs(root, exist_ok=True)
    vocab, merges = _bpe_files(str(root))
    tokenizer = CLIPTokenizer(vocab, merges)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(root)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root)
    return str(root)


def to_causal_wan_lora(adapter):
    """A diffusers-named adapter state dict ``blocks.0.attn1.to_q.lora_A.weight`` as LongLive saves its LoRA: peft
    names of CausalWanModel (``base_model.model.blocks.0.self_attn.q.lora_A.weight``)."""
    from kvpo_kernels.integrations.diffusers.weights import _IN_BLOCK

    inverse = {new: old for old, new in _IN_BLOCK.items()}
    out = {}
    for key, tensor in adapter.items():
        _, index, rest = key.split(".", 2)
        module, part = rest.rsplit(".lora_", 1)
        out[f"base_model.model.blocks.{index}.{inverse[module]}.lora_{part}"] = tensor.clone()
    return out


def randomize_lora(transformer, seed=0, scale=0.05):
    """Random lora_B (peft starts it at 0) so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))


def write_prompts(path, sentences=SENTENCES):
    with open(path, "w") as handle:
        handle.write("\n".join(sentences) + "\n")
    return str(path)


def tiny_inputs(seed=0):
    """(latents [1, C, 2, 8, 8], timestep [1], text [1, 6, TEXT_DIM]) for a plain transformer forward."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, LATENT_CHANNELS, 2, 8, 8, generator=gen), torch.tensor([500.0]),
            torch.randn(1, 6, TEXT_DIM, generator=gen))
