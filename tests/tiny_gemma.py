"""A tiny random Gemma 3 written as GGUF in llama.cpp's layout, and an adapter config that needs
every piece of scale bookkeeping (rsLoRA, per-kernel ranks and alphas): shared by the GGUF,
portable-PEFT and command-line tests."""

import os
import sys

import lora_jax as lj

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import gemma3

TINY = gemma3.Gemma3Config(vocab=512, width=64, layers=2, heads=2, kv_heads=1, head_dim=32, mlp=128)
TARGETS = r"model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
# Per-kernel ranks and alphas and rsLoRA: one alpha cannot express them without folding.
MIXED = lj.LoraConfig(rank=4, alpha=8.0, targets=TARGETS, use_rslora=True, rank_pattern={r".*mlp/down_proj.*": 2},
                      alpha_pattern={r".*self_attn/q_proj.*": 3.0})  # fmt: skip


def scalar(base) -> int:
    """The attention scale's divisor as the GGUF gives it (transformers' GGUF loader does not read it)."""
    return int(gemma3.load(base)[0].query_pre_attn_scalar)
