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
