"""An NNX LoRA train step on a 2x2x2 mesh of simulated CPU devices equals the single-device run.

Run through tests/test_sharding.py (XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

import os
import sys

import jax
import numpy as np
import optax
import pytest
from conftest import leaf_pairs
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
from gpt import GPTConfig, next_token_loss
from gpt_nnx import GPT

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 devices")

CFG = GPTConfig(vocab=64, max_len=16, features=32, heads=4, layers=2)
MODEL = GPT(CFG, nnx.Rngs(1))
GRAPHDEF, STATE = nnx.split(MODEL)
TOKENS = jax.random.randint(jax.random.key(0), (3, 8, CFG.max_len), 0, CFG.vocab)
ROLES = lj.axis_roles(MODEL, TOKENS[0])
CONFIG = lj.LoraConfig(rank=4, alpha=8, targets=r"blocks/\d+/(attn/(query|key|value|out)|fc|proj)/kernel")


def _spec(path: str, leaf) -> P:
    """FSDP on each kernel's first in axis; tensor parallelism on heads and the MLP hidden units."""
    roles = ROLES.get(path)
    if roles is None or leaf.ndim < 2:
        return P()
    axes = [None] * leaf.ndim
    if path.endswith(("query/kernel", "key/kernel", "value/kernel", "fc/kernel")):
        axes[roles.index("out")] = "tensor"
    elif path.endswith(("attn/out/kernel", "proj/kernel")):
        axes[roles.index("in")] = "tensor"
    first_in = roles.index("in")
    if axes[first_in] is None:
        axes[first_in] = "fsdp"
    return P(*axes)


def _run(mesh=None):
    lora = lj.init(jax.random.key(2), STATE, CONFIG, roles=ROLES)
    lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape), lora)
    state, tokens = STATE, TOKENS
    if mesh is not None:
        specs = jax.tree_util.tree_map_with_path(
            lambda kp, x: _spec("/".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in kp[:-1]), x), STATE
        )
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
        state = jax.device_put(STATE, shardings)
        lora = jax.device_put(lora, lj.adapter_shardings(shardings, lora))
        tokens = jax.device_put(TOKENS, NamedSharding(mesh, P(None, ("data", "fsdp"), None)))
    apply, tx = lj.wrap(GRAPHDEF, compute="factored"), optax.adam(1e-2)

    @jax.jit
    def step(lora, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda ad: next_token_loss(apply(state, ad, batch), batch))(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    opt_state, losses = tx.init(lora), []
    for i in range(3):
        lora, opt_state, loss = step(lora, opt_state, tokens[i])
        losses.append(float(loss))
    return losses, lora


def test_nnx_lora_on_a_mesh_equals_one_device():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    want_losses, want = _run()
    losses, got = _run(mesh)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for u, v in leaf_pairs(got, want):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    q = got["blocks"][0]["attn"]["query"]["kernel"]
    assert q.a.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2)  # stays sharded as its kernel
    assert q.b.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tensor", None)), 3)
