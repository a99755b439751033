"""A small GPT-style language model in Flax Linen, written to be read.

Pre-LayerNorm transformer blocks: causal multi-head self-attention (``nn.DenseGeneral``
query/key/value projections ``(features, heads, head_dim)`` and an output projection
``(heads, head_dim, features)``, as Flax's own attention uses) and a GELU MLP (``nn.Dense``).
Token and position embeddings are ``nn.Embed``; the language-model head is an ``nn.Dense``.
Nothing here knows about LoRA: ``lora_jax.wrap`` adapts it from the outside.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256
    max_len: int = 128
    features: int = 128
    heads: int = 4
    layers: int = 4
    mlp_ratio: int = 4
    dtype: jnp.dtype = jnp.float32  # compute dtype (params stay float32 unless cast)


class Attention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        head_dim = cfg.features // cfg.heads
        proj = lambda name: nn.DenseGeneral((cfg.heads, head_dim), dtype=cfg.dtype, name=name)
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # (batch, time, heads, head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(cfg.dtype)
        t = x.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(cfg.features, axis=(-2, -1), dtype=cfg.dtype, name="out")(out)


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = nn.gelu(nn.Dense(cfg.mlp_ratio * cfg.features, dtype=cfg.dtype, name="fc")(x))
        return nn.Dense(cfg.features, dtype=cfg.dtype, name="proj")(h)


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.cfg, name="attn")(nn.LayerNorm(dtype=self.cfg.dtype, name="ln1")(x))
        return x + MLP(self.cfg, name="mlp")(nn.LayerNorm(dtype=self.cfg.dtype, name="ln2")(x))


class GPT(nn.Module):
    """``GPT(cfg)(tokens)`` maps int tokens ``(batch, time)`` to logits ``(batch, time, vocab)``."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = nn.Embed(cfg.vocab, cfg.features, dtype=cfg.dtype, name="embed")(tokens)
        x = x + nn.Embed(cfg.max_len, cfg.features, dtype=cfg.dtype, name="pos")(jnp.arange(tokens.shape[1]))
        for i in range(cfg.layers):
            x = Block(cfg, name=f"block_{i}")(x)
        x = nn.LayerNorm(dtype=cfg.dtype, name="ln_f")(x)
        return nn.Dense(cfg.vocab, dtype=cfg.dtype, name="head")(x).astype(jnp.float32)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``."""
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
