"""Tunix's own Gemma 3 (its ``Einsum`` attention layers, k and v stacked in one kernel) through
``lj.wrap``: no registration, no roles by hand. A check to run by hand where ``google-tunix`` is
installed (it needs transformers 5, so it is not in this project's test environment):

    pip install google-tunix && python examples/tunix_gemma3.py

It prints the roles ``axis_roles`` finds, then the factored step's loss and gradients against
the merged model's, and the factored step's FLOPs over the merged step's.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lora_jax as lj

TARGETS = (
    r"layers/\d+/(attn/(q_einsum|kv_einsum|attn_vec_einsum)/w|mlp/(gate|up|down)_proj/kernel)"
    r"|embedder/input_embedding"
)


def main() -> None:
    from tunix.models.gemma3 import model as tunix_gemma3

    cfg = tunix_gemma3.ModelConfig(num_layers=2, num_embed=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                                   num_kv_heads=2, sliding_window_size=4, param_dtype=jnp.float32)  # fmt: skip
    model = tunix_gemma3.Gemma3(cfg, rngs=nnx.Rngs(0))
    ids = jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    inputs = (ids, jnp.broadcast_to(jnp.arange(6), ids.shape), None, jnp.tril(jnp.ones((2, 6, 6), bool)))
    roles = lj.axis_roles(model, *inputs)
    for path, r in sorted(roles.items()):
        print(f"{path:40s} {r}")
    graphdef, state = nnx.split(model)
    lora = lj.init(jax.random.key(1), state, lj.LoraConfig(rank=4, targets=TARGETS), roles=roles)
    lora = jax.tree.map(lambda t: t + 0.02 * jax.random.normal(jax.random.key(3), t.shape), lora)  # "trained"
    apply = lj.wrap(graphdef, compute="factored")

    def loss(lora, state):
        return jnp.mean(apply(state, lora, *inputs)[0] ** 2)

    def merged(lora, state):
        return jnp.mean(nnx.merge(graphdef, lj.apply_lora(state, lora))(*inputs)[0] ** 2)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lora_jax")  # no use may fall back to the merged kernel
        value, grads = jax.jit(jax.value_and_grad(loss))(lora, state)
    want, want_grads = jax.value_and_grad(merged)(lora, state)
    error = max(float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(jax.tree.leaves(grads),
                                                                                   jax.tree.leaves(want_grads)))
    print(f"\n{len(jax.tree.leaves(lora)) // 2} adapted kernels; loss {float(value):.9f} vs merged {float(want):.9f}; "
          f"largest gradient error {error:.2e} of the gradient's size")  # fmt: skip

    def flops(fn):
        cost = jax.jit(jax.grad(fn)).lower(lora, state).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    merged_apply = lj.wrap(graphdef, compute="merged")
    ratio = flops(loss) / flops(lambda lora, state: jnp.mean(merged_apply(state, lora, *inputs)[0] ** 2))
    print(f"step FLOPs, factored over merged: {ratio:.3f}")


if __name__ == "__main__":
    main()
