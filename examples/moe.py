"""A mixture-of-experts block in Flax: the twin of Hugging Face's GPT-OSS MLP (router, top-k,
experts as ``(experts, in, out)`` parameters applied with ``jax.lax.ragged_dot``).

``GptOssMoE`` computes what ``transformers``' ``GptOssMLP`` computes, with the same parameter
layouts (so its weights and PEFT's ``target_parameters`` adapters load as they are):

- router: ``logits = x ⋅ router.kernel + router.bias``; the ``top_k`` largest, softmaxed;
- experts: ``h = x ⋅ gate_up_proj[e] + gate_up_proj_bias[e]`` with gate and up interleaved
  (``h[..., ::2]``, ``h[..., 1::2]``), ``gate`` clamped above at 7, ``up`` to ±7,
  ``(up + 1) · gate · σ(1.702 · gate)``, then ``⋅ down_proj[e] + down_proj_bias[e]``;
- the ``top_k`` expert outputs of a token weighted by its router weights and summed.

The token–expert pairs are sorted by expert and each expert multiplies only its own rows
(``ragged_dot``): ``2·in·out`` FLOPs per routed pair, where GPT-OSS's inference path in
PyTorch multiplies every token by every expert.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

ALPHA, LIMIT = 1.702, 7.0


class GptOssMoE(nn.Module):
    """GPT-OSS's MLP block on ``x (..., hidden)``; parameters named as in ``transformers``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = GptOssMoE(experts=4, top_k=2, hidden=8, ffn=6)
      >>> x = jnp.ones((3, 8))
      >>> params = block.init(jax.random.key(0), x)["params"]
      >>> params["gate_up_proj"].shape, block.apply({"params": params}, x).shape
      ((4, 8, 12), (3, 8))
    """

    experts: int
    top_k: int
    hidden: int
    ffn: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        e, f, d = self.experts, self.ffn, self.hidden
        gate_up = self.param("gate_up_proj", init, (e, d, 2 * f))
        gate_up_bias = self.param("gate_up_proj_bias", init, (e, 2 * f))
        down = self.param("down_proj", init, (e, f, d))
        down_bias = self.param("down_proj_bias", init, (e, d))
        lead, x = x.shape[:-1], x.reshape(-1, d)
        logits = nn.Dense(e, kernel_init=init, bias_init=init, name="router")(x)
        top, chosen = jax.lax.top_k(logits, self.top_k)  # (tokens, k)
        weights = jax.nn.softmax(top, axis=-1)
        # The (token, expert) pairs sorted by expert: each expert's rows are contiguous.
        expert = chosen.reshape(-1)
        order = jnp.argsort(expert, stable=True)
        token, expert = order // self.top_k, expert[order]
        group_sizes = jnp.bincount(expert, length=e).astype(jnp.int32)
        h = jax.lax.ragged_dot(x[token], gate_up, group_sizes) + gate_up_bias[expert]
        gate, up = jnp.minimum(h[:, ::2], LIMIT), jnp.clip(h[:, 1::2], -LIMIT, LIMIT)
        act = (up + 1) * gate * jax.nn.sigmoid(gate * ALPHA)
        out = jax.lax.ragged_dot(act, down, group_sizes) + down_bias[expert]
        out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
        return jnp.zeros_like(x).at[token].add(out).reshape(*lead, d)


class GptOss(nn.Module):
    """GPT-OSS in Flax (``transformers``' ``GptOssForCausalLM``, full attention): token embedding,
    blocks of RMSNorm, grouped-query attention with RoPE and per-head attention sinks, RMSNorm
    and :class:`GptOssMoE`, a final RMSNorm and the LM head. Parameter names follow PyTorch's
    (``layers_{i}/self_attn/q_proj/kernel`` for ``layers.{i}.self_attn.q_proj.weight``, kernels
    ``(in, out)``). The rotary frequencies are given (``rope_inv_freq``, ``rope_scale``: those of
    the PyTorch model's ``rotary_emb``), so any of its RoPE variants (GPT-OSS's YaRN) is exact.
    Sliding-window layers are not modelled.

    ``GptOss(...)(tokens (batch, time))`` gives logits ``(batch, time, vocab)``.
    """

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    ffn: int
    rope_inv_freq: tuple[float, ...]
    rope_scale: float = 1.0
    eps: float = 1e-5

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.hidden, name="embed_tokens")(tokens)
        t = tokens.shape[1]
        angles = jnp.arange(t, dtype=jnp.float32)[:, None] * jnp.asarray(self.rope_inv_freq, jnp.float32)
        cos, sin = jnp.cos(angles) * self.rope_scale, jnp.sin(angles) * self.rope_scale  # (time, head_dim / 2)
        for i in range(self.layers):
            layer = f"layers_{i}"
            h = _RMSNorm(self.eps, name=f"{layer}_input_layernorm")(x)
            x = x + _Attention(self.heads, self.kv_heads, self.head_dim, self.hidden, name=f"{layer}_self_attn")(
                h, cos, sin
            )
            h = _RMSNorm(self.eps, name=f"{layer}_post_attention_layernorm")(x)
            x = x + GptOssMoE(self.experts, self.top_k, self.hidden, self.ffn, name=f"{layer}_mlp")(h)
        x = _RMSNorm(self.eps, name="norm")(x)
        return nn.Dense(self.vocab, use_bias=False, name="lm_head")(x)


class _RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        return weight * (x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)


class _Attention(nn.Module):
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q = nn.Dense(self.heads * self.head_dim, name="q_proj")(x).reshape(b, t, self.heads, self.head_dim)
        k = nn.Dense(self.kv_heads * self.head_dim, name="k_proj")(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = nn.Dense(self.kv_heads * self.head_dim, name="v_proj")(x).reshape(b, t, self.kv_heads, self.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        groups = self.heads // self.kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim**-0.5
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        sinks = self.param("sinks", nn.initializers.zeros, (self.heads,))
        sink = jnp.broadcast_to(sinks[None, :, None, None], (b, self.heads, t, 1)).astype(logits.dtype)
        probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]  # the sink dropped
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.heads * self.head_dim)
        return nn.Dense(self.hidden, name="o_proj")(out)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """GPT-OSS's RoPE: the two halves of each head rotated by ``(cos, sin)`` ``(time, head_dim / 2)``."""
    first, second = jnp.split(x, 2, axis=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(x.dtype)


def torch_name(path: str) -> str:
    """A :class:`GptOss` parameter path -> the PyTorch module (or, for the experts' weights, the
    parameter) name: ``layers_0_self_attn/q_proj/kernel`` -> ``model.layers.0.self_attn.q_proj``,
    ``layers_0_mlp/gate_up_proj`` -> ``model.layers.0.mlp.experts.gate_up_proj``. The
    ``name_map`` of :func:`lora_jax.to_peft` / :func:`lora_jax.from_peft` for this model."""
    keys = path.split("/")
    if keys[-1] in ("kernel", "embedding", "weight"):
        keys = keys[:-1]
    if keys[0] == "lm_head":
        return "lm_head"
    head, rest = keys[0], keys[1:]
    if head.startswith("layers_"):
        index, _, part = head.removeprefix("layers_").partition("_")
        head = f"layers.{index}.{part}"
        if part == "mlp" and rest and rest[0] != "router":
            rest = ["experts", *rest]
    return ".".join(["model", head, *rest])
