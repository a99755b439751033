"""The GPT of ``gpt.py`` written in Flax NNX, layer for layer (the same shapes and math).

Attention projections are ``nnx.LinearGeneral`` (query/key/value ``(features, heads,
head_dim)``, output ``(heads, head_dim, features)``), the MLP ``nnx.Linear``, embeddings
``nnx.Embed``. Nothing here knows about LoRA: ``lora_jax.wrap(model)`` adapts it from outside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from gpt import GPTConfig


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        head_dim = cfg.features // cfg.heads
        proj = lambda: nnx.LinearGeneral(cfg.features, (cfg.heads, head_dim), dtype=cfg.dtype, rngs=rngs)
        self.query, self.key, self.value = proj(), proj(), proj()
        self.out = nnx.LinearGeneral((cfg.heads, head_dim), cfg.features, axis=(-2, -1), dtype=cfg.dtype, rngs=rngs)
        self.head_dim, self.dtype = head_dim, cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self.query(x), self.key(x), self.value(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim).astype(self.dtype)
        t = x.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v))


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.features, dtype=cfg.dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.ln2 = nnx.LayerNorm(cfg.features, dtype=cfg.dtype, rngs=rngs)
        self.fc = nnx.Linear(cfg.features, cfg.mlp_ratio * cfg.features, dtype=cfg.dtype, rngs=rngs)
        self.proj = nnx.Linear(cfg.mlp_ratio * cfg.features, cfg.features, dtype=cfg.dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(nnx.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
    """``GPT(cfg, rngs)(tokens)`` maps int tokens ``(batch, time)`` to logits ``(batch, time, vocab)``."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab, cfg.features, dtype=cfg.dtype, rngs=rngs)
        self.pos = nnx.Embed(cfg.max_len, cfg.features, dtype=cfg.dtype, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.ln_f = nnx.LayerNorm(cfg.features, dtype=cfg.dtype, rngs=rngs)
        self.head = nnx.Linear(cfg.features, cfg.vocab, dtype=cfg.dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)).astype(jnp.float32)
