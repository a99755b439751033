"""The choice between the factored forward and merging inside the step (wrap(compute=...)).

The reference for "cheaper" is XLA's own FLOP count of the compiled step, not the cost model.
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import Scanned, leaf_pairs, randomize
from flax import nnx

import lora_jax as lj
from lora_jax._core import cost as _cost

MODES = ("factored", "merged", "auto")


class MLP(nn.Module):
    hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out, name="down")(nn.gelu(nn.Dense(self.hidden, name="up")(x)))


def _setup(width, hidden, rank, tokens, seed=0):
    model = MLP(hidden, width)
    x = jax.random.normal(jax.random.key(seed), (tokens, width))
    params = model.init(jax.random.key(seed + 1), x)["params"]
    lora = randomize(lj.init(jax.random.key(seed + 2), params, lj.LoraConfig(rank=rank)), jax.random.key(seed + 3), 0.1)
    return model, x, params, lora


def _step_flops(model, x, params, lora, compute):
    apply = lj.wrap(model.apply, compute=compute)
    grad = jax.jit(jax.grad(lambda ad: jnp.sum(apply({"params": params, "lora": ad}, x) ** 2)))
    cost = grad.lower(lora).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize(
    "rank, tokens, cheaper",
    [
        (4, 4096, "factored"),  # a small rank: factored at any token count
        (96, 2048, "merged"),  # a rank above the bound and many tokens
        (96, 16, "factored"),  # the same rank on a few tokens (generation): the merge does not pay
    ],
)
@pytest.mark.slow
def test_auto_compiles_the_step_xla_counts_cheaper(rank, tokens, cheaper):
    setup = _setup(128, 128, rank, tokens)
    flops = {mode: _step_flops(*setup, mode) for mode in MODES}
    assert min(flops["factored"], flops["merged"]) == flops[cheaper]
    assert flops["auto"] == flops[cheaper]


@pytest.mark.slow
def test_auto_mixes_the_forms_per_kernel_and_beats_both():
    # GPT at width 128, rank 32, 512 tokens: the square attention kernels are cheaper merged,
    # the 128 x 512 MLP kernels factored, so auto is below both uniform forms.
    model, x, params, lora = _gpt_setup(rank=32)
    flops = {mode: _step_flops(model, x, params, lora, mode) for mode in MODES}
    assert flops["auto"] < min(flops["factored"], flops["merged"])


def _gpt_setup(rank):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
    from gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab=64, max_len=64, features=128, heads=2, layers=1)
    model = GPT(cfg)
    ids = jax.random.randint(jax.random.key(0), (8, 64), 0, 64)
    params = model.init(jax.random.key(1), ids)["params"]
    targets = r"block_\d+/(attn/(query|key|value|out)|mlp/(fc|proj))/kernel"
    config = lj.LoraConfig(rank=rank, targets=targets)
    lora = lj.init(jax.random.key(2), params, config, roles=lj.axis_roles(model, ids))
    return model, ids, params, lora


def test_the_cost_model_and_its_bound():
    # per token, factored 6·r·(I+O) vs merged 2·I·O: merging can only win above r = I·O / (3(I+O))
    usage = lj.extend.Usage(tokens=10**6, fan_in=256, fan_out=256)
    factored, merged = lj.extend.lowrank_costs([usage], 42)
    assert factored < merged  # 42 < 42.67
    factored, merged = lj.extend.lowrank_costs([usage], 43)
    assert merged < factored
    assert lj.extend.lowrank_costs([lj.extend.Usage(1, 256, 256)], 256)[0] < lj.extend.lowrank_costs([lj.extend.Usage(1, 256, 256)], 256)[1]
    a = lambda rank: lj.Adapter(jnp.zeros((256, rank)), jnp.zeros((rank, 256)), rank=rank, alpha=1.0)
    assert not _cost.mergeable(a(42)) and _cost.mergeable(a(43))
    # calls add up; the merge itself is paid once
    one, two = lj.extend.lowrank_costs([usage], 64), lj.extend.lowrank_costs([usage, usage], 64)
    assert two[0] == 2 * one[0] and two[1] == 2 * one[1] - 6 * 256 * 256 * 64
    # a lookup has no x⋅a GEMM, and its merged call only scatters the gradient rows
    assert lj.extend.lowrank_costs([lj.extend.Usage(10, 1000, 64, lookup=True)], 8) == (4 * 10 * 8 * 64, 10 * 64 + 6 * 1000 * 64 * 8)
    assert _cost.choose({"k": a(64)}, {"k": [lj.extend.Usage(4096, 256, 256)]}) == {"k"}
    assert _cost.choose({"k": a(64)}, {"k": [lj.extend.Usage(8, 256, 256)]}) == set()
    assert _cost.choose({"k": a(8)}, {"k": [lj.extend.Usage(10**9, 256, 256)]}) == set()


def test_usage_of_each_layer_spec():
    x = jnp.ones((2, 5, 6))
    assert _cost.usage(lj.extend.Einsum("...i,io->...o", x), (6, 3)) == lj.extend.Usage(10, 6, 3)
    assert _cost.usage(lj.extend.Einsum("btd,dhk->bthk", x), (6, 2, 4)) == lj.extend.Usage(10, 6, 8)
    assert _cost.usage(lj.extend.Einsum("bhd,hdo->bho", jnp.ones((3, 2, 4))), (2, 4, 7)) == lj.extend.Usage(3, 4, 7, stack=2)
    assert _cost.usage(lj.extend.Einsum("...f,vf->...v", x, ("in", "out")), (9, 6)) == lj.extend.Usage(10, 9, 6)
    img = jnp.ones((2, 8, 8, 3))  # stride 2, SAME: 4 x 4 output positions per image
    conv = lj.extend.Conv(img, (2, 2), "SAME", (1, 1), (1, 1))
    assert _cost.usage(conv, (3, 3, 3, 5)) == lj.extend.Usage(2 * 4 * 4, 27, 5)
    assert _cost.usage(lj.extend.Lookup(jnp.zeros((4, 7), jnp.int32)), (50, 6)) == lj.extend.Usage(28, 50, 6, lookup=True)


@pytest.mark.slow
@pytest.mark.parametrize("compute", MODES)
def test_every_mode_computes_the_merged_model_and_trains_the_adapters_only(compute):
    model, x, params, lora = _setup(64, 96, 48, 256)
    apply = lj.wrap(model.apply, compute=compute)

    def loss(ad, p):
        return jnp.sum(apply({"params": p, "lora": ad}, x) ** 2)

    def merged_loss(ad):
        return jnp.sum(model.apply({"params": lj.apply_lora(params, ad)}, x) ** 2)

    value, (g_lora, g_base) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(lora, params)
    want, want_grads = jax.value_and_grad(merged_loss)(lora)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for got, ref in leaf_pairs(g_lora, want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert all(not np.any(g) for g in jax.tree.leaves(g_base))  # the base stays frozen, merged or not


@pytest.mark.slow
def test_merged_form_computes_the_weight_gradient_factored_does_not():
    model, x, params, lora = _setup(64, 96, 48, 256)
    hlos = {}
    for compute in ("factored", "merged"):
        apply = lj.wrap(model.apply, compute=compute)
        step = jax.jit(jax.grad(lambda ad: jnp.sum(apply({"params": params, "lora": ad}, x) ** 2)))  # noqa: B023
        hlos[compute] = step.lower(lora).compile().as_text()
    weight_grad = re.compile(r"f32\[(64,96|96,64)\]\{[0-9,]*\} dot\(")  # xᵀ⋅g of the up kernel
    assert weight_grad.search(hlos["merged"])
    assert not weight_grad.search(hlos["factored"])


@pytest.mark.slow
def test_active_dropout_stays_factored_and_merged_refuses_it():
    model, x, params, _ = _setup(64, 64, 48, 512)
    lora = lj.init(jax.random.key(2), params, lj.LoraConfig(rank=48, dropout=0.5))
    key = {"dropout": jax.random.key(0)}
    variables = {"params": params, "lora": randomize(lora, jax.random.key(4), 0.1)}
    auto = lj.wrap(model.apply)(variables, x, lora_training=True, rngs=key)
    factored = lj.wrap(model.apply, compute="factored")(variables, x, lora_training=True, rngs=key)
    np.testing.assert_array_equal(auto, factored)  # the same dropout mask: the same computation
    with pytest.raises(ValueError, match="compute='merged' cannot apply LoRA dropout.*'down/kernel'"):
        lj.wrap(model.apply, compute="merged")(variables, x, lora_training=True, rngs=key)
    # not training: no dropout, and merged is allowed
    lj.wrap(model.apply, compute="merged")(variables, x)


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["fast", None, 1])
def test_a_bad_compute_mode_is_refused(bad):
    model, x, params, lora = _setup(8, 8, 2, 4)
    with pytest.raises(ValueError, match=r"lora_jax.wrap: compute must be one of \('auto', 'factored', 'merged'\)"):
        lj.wrap(model.apply, compute=bad)
    with pytest.raises(ValueError, match="lora_jax.attach: compute must be one of"):
        lj.attach(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), {}, compute=bad)


def test_merged_keeps_strictness_about_unused_adapters():
    model, x, params, lora = _setup(8, 8, 2, 4)
    with pytest.raises(ValueError, match="never uses in this call"):
        lj.wrap(model.apply, compute="merged")({"params": params, "lora": lora}, x, method=lambda m, x: x)


@pytest.mark.slow
def test_a_layer_traced_twice_by_nn_scan_counts_once(monkeypatch):
    seen = []
    choose = _cost.choose
    monkeypatch.setattr(_cost, "choose", lambda adapters, usages: seen.append(usages) or choose(adapters, usages))
    model, x = Scanned(), jnp.ones((4, 5, 32))
    params = model.init(jax.random.key(0), x)["params"]
    lora = lj.init(jax.random.key(1), params, lj.LoraConfig(rank=16), roles=lj.axis_roles(model, x))
    lj.wrap(model.apply)({"params": params, "lora": lora}, x)
    assert seen == [{"blocks/mix/kernel": [lj.extend.Usage(20, 32, 32)]}]


# ---- NNX --------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, width, hidden, rngs):
        self.up = nnx.Linear(width, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, width, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


@pytest.mark.parametrize("rank, tokens, cheaper", [(4, 2048, "factored"), (96, 2048, "merged")])
def test_nnx_functional_auto_compiles_the_cheaper_step(rank, tokens, cheaper):
    model = NnxMLP(128, 128, nnx.Rngs(0))
    state = nnx.state(model)
    x = jax.random.normal(jax.random.key(1), (tokens, 128))
    lora = lj.init(jax.random.key(2), state, lj.LoraConfig(rank=rank))
    flops = {}
    for mode in MODES:
        apply = lj.wrap(model, compute=mode)
        grad = jax.jit(jax.grad(lambda ad: jnp.sum(apply(state, ad, x) ** 2)))  # noqa: B023
        cost = grad.lower(lora).compile().cost_analysis()
        flops[mode] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert flops["auto"] == flops[cheaper] == min(flops["factored"], flops["merged"])


@pytest.mark.slow
@pytest.mark.parametrize("compute", MODES)
def test_nnx_stateful_attach_trains_in_every_mode(compute):
    x = jax.random.normal(jax.random.key(1), (1024, 64))
    model = NnxMLP(64, 64, nnx.Rngs(0))
    reference = NnxMLP(64, 64, nnx.Rngs(0))
    lora = randomize(lj.init(jax.random.key(2), nnx.state(model), lj.LoraConfig(rank=48)), jax.random.key(3), 0.1)
    lj.attach(model, lora, compute=compute)
    optimizer = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(
            model
        )
        optimizer.update(model, grads)
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = step(model, optimizer)
    base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    kernels_after = nnx.state(model, base)
    want = jnp.mean(nnx.merge(*nnx.split(reference), copy=True)(x) ** 2)
    merged_ref = nnx.merge(nnx.graphdef(reference), lj.apply_lora(nnx.state(reference), lora))
    np.testing.assert_allclose(loss, jnp.mean(merged_ref(x) ** 2), rtol=1e-5)
    assert not np.isclose(loss, want)  # the adapters did change the output
    # the base kernels are untouched after the step, the adapters moved
    for got, ref in leaf_pairs(kernels_after, nnx.state(reference, base)):
        np.testing.assert_array_equal(got, ref)
    trained = lj.detach(model)
    assert any(not np.array_equal(t, o) for t, o in leaf_pairs(trained, lora))


def test_nnx_stateful_auto_compiles_the_cheaper_call():
    x = jax.random.normal(jax.random.key(1), (2048, 128))
    flops = {}
    for mode in MODES:
        model = NnxMLP(128, 128, nnx.Rngs(0))
        lj.attach(model, lj.init(jax.random.key(2), nnx.state(model), lj.LoraConfig(rank=96)), compute=mode)
        graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss(lora_state, rest):
            return jnp.sum(nnx.merge(graphdef, lora_state, rest)(x) ** 2)  # noqa: B023

        cost = jax.jit(jax.grad(loss)).lower(lora_state, rest).compile().cost_analysis()
        flops[mode] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert flops["auto"] == flops["merged"] < flops["factored"]

