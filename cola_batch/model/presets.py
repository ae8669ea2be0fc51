"""Named model shapes (`tiny`, `small`, `cola-2b`), reference initialisation and a tokenizer.

Contract:
* `preset_configs(name)` -> (TextVAEConfig, DiTConfig); `cola-2b` is the released shape (spec
  defaults), `tiny`/`small` are fast random models whose vocab equals the tokenizer's (1024).
* `init_weights_` applies the reference init with an explicit `torch.Generator`: VAE Linear and
  Embedding weights truncated normal (init_std, ±init_cutoff_factor·std), Linear biases 0,
  LayerNorm 1/0, the patch Conv1d PyTorch's default recipe; DiT Linear weights Xavier-uniform,
  biases 0, LayerNorm 1/0, RoPE freqs at their constructor value.
* `build_tokenizer()` trains a byte-level BPE deterministically on text generated here (no
  external data) with 1020 learned entries and the special tokens `<|endoftext|>`,
  `<|im_start|>`, `<|im_end|>`, `<|pad|>` at ids 1020..1023.
* `build_preset` builds everything in memory; `count_parameters` works on the meta device.
"""

from __future__ import annotations

import math
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from cola_batch.model.checkpoint import ColaModel, keep_fp32, parse_dtype
from cola_batch.model.config import DiTConfig, TextVAEConfig
from cola_batch.model.dit import DiT, default_rope_freqs
from cola_batch.model.vae import TextVAE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TOKENIZER_VOCAB = 1024
PRESETS = ("tiny", "small", "cola-2b")


def preset_configs(name: str) -> tuple[TextVAEConfig, DiTConfig]:
    if name == "tiny":
        return (
            TextVAEConfig(
                vocab_size=TOKENIZER_VOCAB,
                encoder_num_blocks=2,
                decoder_num_blocks=2,
                dim=64,
                ffn_dim=128,
                latent_dim=8,
                num_heads=4,
                block_size=4,
            ),
            DiTConfig(
                txt_in_channels=8,
                txt_out_channels=8,
                txt_dim=64,
                emb_dim=64,
                heads=4,
                head_dim=16,
                num_layers=2,
                rope_dim=12,
                block_size=4,
            ),
        )
    if name == "small":
        return (
            TextVAEConfig(
                vocab_size=TOKENIZER_VOCAB,
                encoder_num_blocks=2,
                decoder_num_blocks=2,
                dim=512,
                ffn_dim=2048,
                latent_dim=16,
                num_heads=8,
                block_size=4,
            ),
            DiTConfig(
                txt_in_channels=16,
                txt_out_channels=16,
                txt_dim=512,
                emb_dim=512,
                heads=8,
                head_dim=64,
                num_layers=8,
                rope_dim=48,
                block_size=4,
            ),
        )
    if name == "cola-2b":
        return TextVAEConfig(), DiTConfig()
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def count_parameters(module: nn.Module) -> int:
    """Elements of the saved state (parameters plus persistent buffers)."""
    return sum(t.numel() for t in module.state_dict().values())


def meta_models(name: str) -> tuple[TextVAE, DiT]:
    vae_cfg, dit_cfg = preset_configs(name)
    with torch.device("meta"):
        return TextVAE(vae_cfg), DiT(dit_cfg)


@torch.no_grad()
def init_vae_(model: TextVAE, generator: torch.Generator) -> None:
    cfg = model.config
    std, cut = cfg.init_std, cfg.init_cutoff_factor * cfg.init_std
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=std, a=-cut, b=cut, generator=generator)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            # torch's own Conv1d reset_parameters, drawn from our generator
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            assert module.bias is not None
            fan_in = module.weight.shape[1] * module.weight.shape[2]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)


@torch.no_grad()
def init_dit_(model: DiT, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for block in model.blocks:
        block.msa.rope.rope.freqs.copy_(default_rope_freqs(model.config.rope_dim))


def _corpus(seed: int = 20240601, words: int = 40000) -> list[str]:
    """Deterministic pseudo-English lines made from a small syllable inventory."""
    rng = random.Random(seed)
    onsets = [
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "th",
        "st",
        "ch",
        "w",
        "pr",
        "gr",
        "sh",
        "v",
        "k",
        "tr",
    ]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "ee", "oo"]
    codas = ["", "", "n", "r", "s", "t", "nd", "ng", "ll", "ck", "st", "m", "d"]
    lexicon = []
    for _ in range(3000):
        word = "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
            for _ in range(rng.choice([1, 1, 2, 2, 3]))
        )
        lexicon.append(word)
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]  # Zipf-like frequencies
    lines, line = [], []
    for i, word in enumerate(rng.choices(lexicon, weights=weights, k=words)):
        if not line:
            word = word.capitalize()
        line.append(word)
        if len(line) > 6 and rng.random() < 0.15:
            punct = rng.choice([".", ".", "?", "!", ","])
            lines.append(" ".join(line) + punct + (f" {i % 1000}" if rng.random() < 0.1 else ""))
            line = []
    return lines


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def build_preset(
    name: str, *, seed: int = 0, dtype: str | torch.dtype = torch.float32
) -> ColaModel:
    """Random reference-initialised models of preset `name` plus a fresh tokenizer."""
    vae_cfg, dit_cfg = preset_configs(name)
    target = parse_dtype(dtype)
    generator = torch.Generator().manual_seed(seed)
    vae, dit = TextVAE(vae_cfg), DiT(dit_cfg)
    init_vae_(vae, generator)
    init_dit_(dit, generator)
    for model in (vae, dit):
        for pname, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not keep_fp32(pname):
                tensor.data = tensor.data.to(target)
    tokenizer = build_tokenizer()
    if tokenizer.get_vocab_size() > vae_cfg.vocab_size:
        raise ValueError("tokenizer larger than the model vocabulary")
    return ColaModel(
        vae=vae.eval().requires_grad_(False),
        dit=dit.eval().requires_grad_(False),
        tokenizer=tokenizer,
        root=None,
    )
