"""wrap / axis_roles: training behaviour, the cost of the backward pass, and bad input."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import leaf_pairs, randomize

import lora_jax as lj

VOCAB, D, T = 32, 24, 7


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.DenseGeneral((2, D // 2), name=n)(h) for n in ("query", "key", "value"))
        att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D // 2), axis=-1)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(jnp.einsum("bhts,bshd->bthd", att, v))
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(40, name="fc1")(h)))


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, ids, head=True):
        x = nn.Embed(VOCAB, D, name="embed")(ids)
        x = Block(name="block_0")(x)
        x = Block(name="block_1")(x)
        if head:  # a layer that apply can skip
            x = nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))
        return x


IDS = jax.random.randint(jax.random.key(0), (2, T), 0, VOCAB)
MODEL = TinyLM()
PARAMS = MODEL.init(jax.random.key(1), IDS)["params"]
ROLES = lj.axis_roles(MODEL, IDS)
CONFIG = lj.LoraConfig(rank=4, alpha=8, targets=r"block_\d/.*/kernel")


def _lora(seed=2, **config):
    cfg = lj.LoraConfig(**{**dict(rank=4, alpha=8, targets=r"block_\d/.*/kernel"), **config})
    return randomize(lj.init(jax.random.key(seed), PARAMS, cfg, roles=ROLES), jax.random.key(seed + 1), 0.2)


def _xent(logits):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), IDS[:, 1:, None], -1))


def test_axis_roles_of_a_transformer():
    assert ROLES["block_0/query/kernel"] == ("in", "out", "out")
    assert ROLES["block_1/out/kernel"] == ("in", "in", "out")
    assert ROLES["block_0/fc1/kernel"] == ("in", "out")
    assert ROLES["embed/embedding"] == ("in", "out")
    assert "block_0/ln1/scale" not in ROLES


@pytest.mark.slow
def test_grads_wrt_whole_dict_reach_adapters_only():
    lora = _lora()
    apply = lj.wrap(MODEL.apply, compute="factored")
    grads = jax.grad(lambda v: _xent(apply(v, IDS)))({"params": PARAMS, "lora": lora})
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["params"]))
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["lora"]))


@pytest.mark.slow
def test_trainable_base_subtree_gets_gradients():
    apply = lj.wrap(MODEL.apply, compute="factored")
    lora = _lora(trainable=r"head/.*")
    variables = {"params": PARAMS, "lora": lora}
    grads = jax.grad(lambda v: _xent(apply(v, IDS)))(variables)
    assert np.any(np.asarray(grads["lora"]["head"]["kernel"].value))
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["params"]))
    # The fully trained head replaces the base head, as in the merged model.
    moved = dict(lora, head={"kernel": lj.FullWeight(lora["head"]["kernel"].value + 1.0), "bias": lora["head"]["bias"]})
    merged = MODEL.apply({"params": lj.apply_lora(PARAMS, moved)}, IDS)
    np.testing.assert_allclose(apply({"params": PARAMS, "lora": moved}, IDS), merged, rtol=1e-5, atol=1e-5)


def _flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.slow
def test_lora_step_costs_less_than_full_finetuning_and_computes_no_weight_gradient():
    """Structural, not timed: XLA's own FLOP count, and no dot producing a frozen kernel's gradient."""
    lora = _lora()
    apply = lj.wrap(MODEL.apply, compute="factored")
    full = jax.grad(lambda p: _xent(MODEL.apply({"params": p}, IDS)))
    factored = jax.grad(lambda ad: _xent(apply({"params": PARAMS, "lora": ad}, IDS)))
    whole = jax.grad(lambda v: _xent(apply(v, IDS)))
    merged = jax.grad(lambda ad: _xent(MODEL.apply({"params": lj.apply_lora(PARAMS, ad)}, IDS)))
    f_full, f_fact = _flops(full, PARAMS), _flops(factored, lora)
    f_whole = _flops(whole, {"params": PARAMS, "lora": lora})
    f_merged = _flops(merged, lora)
    assert f_fact < f_full and f_whole < f_full
    assert f_fact < f_merged  # the merged path pays for x^T g of every adapted kernel
    # The backward pass of full fine-tuning has dots whose result is a (D, 40) fc1 kernel gradient;
    # the factored step has none.
    kernel_grad = re.compile(r"f32\[24,40\]\{[0-9,]*\} (dot|convolution)\(")
    hlo_full = jax.jit(full).lower(PARAMS).compile().as_text()
    hlo_fact = jax.jit(factored).lower(lora).compile().as_text()
    assert kernel_grad.search(hlo_full) and not kernel_grad.search(hlo_fact)


@pytest.mark.slow
def test_optimizer_path_trains_and_keeps_base_bit_identical():
    apply = lj.wrap(MODEL.apply, compute="factored")
    variables = {"params": PARAMS, "lora": lj.init(jax.random.key(0), PARAMS, CONFIG, roles=ROLES)}
    tx = lj.optimizer(optax.adam(3e-2))
    state = tx.init(variables)
    loss = lambda v: _xent(apply(v, IDS))

    @jax.jit
    def step(variables, state):
        grads = jax.grad(loss)(variables)
        updates, state = tx.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state

    first = loss(variables)
    for _ in range(20):
        variables, state = step(variables, state)
    assert loss(variables) < 0.8 * first
    for u, v in leaf_pairs(variables["params"], PARAMS):
        np.testing.assert_array_equal(u, v)


@pytest.mark.slow
def test_dropout_only_when_training_with_an_rng():
    lora = _lora(dropout=0.5)
    apply = lj.wrap(MODEL.apply, compute="factored")
    v = {"params": PARAMS, "lora": lora}
    merged = MODEL.apply({"params": lj.apply_lora(PARAMS, lora)}, IDS)
    rngs = {"dropout": jax.random.key(5)}
    np.testing.assert_allclose(apply(v, IDS), merged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply(v, IDS, rngs=rngs), merged, rtol=1e-5, atol=1e-5)  # rng alone: off
    y1 = apply(v, IDS, rngs=rngs, lora_training=True)
    y2 = apply(v, IDS, rngs={"dropout": jax.random.key(6)}, lora_training=True)
    assert not np.allclose(y1, merged, atol=1e-3) and not np.allclose(y1, y2, atol=1e-3)
    np.testing.assert_array_equal(y1, apply(v, IDS, rngs=rngs, lora_training=True))  # deterministic per key
    # Dropout acts on the branch only: with a fresh (b = 0) adapter training changes nothing.
    fresh = {
        "params": PARAMS,
        "lora": lj.init(
            jax.random.key(0), PARAMS, lj.LoraConfig(rank=4, targets=r"block_\d/.*/kernel", dropout=0.5), roles=ROLES
        ),
    }
    np.testing.assert_array_equal(
        apply(fresh, IDS, rngs=rngs, lora_training=True), MODEL.apply({"params": PARAMS}, IDS)
    )


@pytest.mark.slow
def test_dropout_matches_peft_semantics_on_a_dense_layer():
    """y = x W + bias + scale · (dropout(x) a) b, with the mask drawn from the layer's dropout rng."""
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    params = model.init(jax.random.key(1), x)["params"]
    lora = randomize(
        lj.init(jax.random.key(2), params, lj.LoraConfig(rank=2, alpha=4, dropout=0.25)), jax.random.key(3)
    )
    y = lj.wrap(model.apply, compute="factored")(
        {"params": params, "lora": lora}, x, rngs={"dropout": jax.random.key(9)}, lora_training=True
    )
    ad = lora["kernel"]
    base = np.asarray(x @ params["kernel"] + params["bias"], np.float64)
    branch = (np.asarray(y, np.float64) - base) / ad.scale
    # Recover the kept inputs: the branch equals (x ⊙ m / 0.75) a b for some 0/1 mask m.
    a, b = np.asarray(ad.a, np.float64), np.asarray(ad.b, np.float64)
    masks = [np.array([(i >> j) & 1 for j in range(6)]) for i in range(64)]
    for row in range(4):
        errs = [np.abs((x[row] * m / 0.75) @ a @ b - branch[row]).max() for m in masks]
        assert min(errs) < 1e-4


@pytest.mark.slow
def test_remat_and_scan_under_jit_grad():
    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = nn.scan(
                nn.remat(_ScanLayer),
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=2,
            )
            return layer(name="layers")(x, None)[0]

    x = jax.random.normal(jax.random.key(0), (3, D))
    model = Scanned()
    params = model.init(jax.random.key(1), x)["params"]
    lora = randomize(
        lj.init(jax.random.key(2), params, lj.LoraConfig(rank=2, dropout=0.1), roles=lj.axis_roles(model, x)),
        jax.random.key(3),
    )
    apply = lj.wrap(model.apply, compute="factored")
    y = jax.jit(functools.partial(apply, lora_training=True))(
        {"params": params, "lora": lora}, x, rngs={"dropout": jax.random.key(4)}
    )
    assert y.shape == (3, D)
    g = jax.jit(jax.grad(lambda ad: jnp.sum(apply({"params": params, "lora": ad}, x) ** 2)))(lora)
    g_m = jax.grad(lambda ad: jnp.sum(model.apply({"params": lj.apply_lora(params, ad)}, x) ** 2))(lora)
    for u, v in leaf_pairs(g, g_m):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5 * (1 + np.abs(v).max()))


class _ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(D, name="dense")(x)), None


# ---- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [MODEL, MODEL.init, "apply"])
def test_wrap_rejects_near_misses_of_a_linen_apply(fn):
    with pytest.raises(
        TypeError, match=r"lora_jax\.wrap: expected a function fn\(params, \*args\), a Flax Linen model's apply"
    ):
        lj.wrap(fn, compute="factored")


@pytest.mark.slow
def test_wrap_accepts_partial_of_apply():
    apply = lj.wrap(functools.partial(MODEL.apply, head=False), compute="factored")
    assert apply({"params": PARAMS, "lora": _lora()}, IDS).shape == (2, T, D)


def test_variables_without_lora():
    with pytest.raises(
        TypeError, match=r"takes variables \{'params': base, 'lora': adapters, \.\.\.\}; found \['params'\]"
    ):
        lj.wrap(MODEL.apply, compute="factored")({"params": PARAMS}, IDS)


def test_training_without_dropout_rng():
    with pytest.raises(ValueError, match=r"lora_training=True needs a dropout rng: pass rngs=\{'dropout': key\}"):
        lj.wrap(MODEL.apply, compute="factored")({"params": PARAMS, "lora": _lora()}, IDS, lora_training=True)


def test_adapter_for_kernel_missing_from_params():
    lora = _lora()
    lora["decoder"] = {"kernel": lora["block_0"]["fc1"]["kernel"]}
    with pytest.raises(
        ValueError, match=r"adapters name kernels that params lacks:\n  'decoder/kernel'\n\(params has e\.g\."
    ):
        lj.wrap(MODEL.apply, compute="factored")({"params": PARAMS, "lora": lora}, IDS)


def test_adapter_for_kernel_the_model_never_uses():
    cfg = lj.LoraConfig(rank=2, targets=r"(head|block_0/fc1)/kernel")
    lora = lj.init(jax.random.key(0), PARAMS, cfg)
    with pytest.raises(
        ValueError, match=r"adapters name kernels that the model never uses in this call:\n  'head/kernel'"
    ):
        lj.wrap(MODEL.apply, compute="factored")({"params": PARAMS, "lora": lora}, IDS, head=False)


def test_roles_that_contradict_the_layer():
    # Shape-compatible with the (24, 2, 12) query kernel, but with the wrong axis roles.
    bad_roles = dict(
        ROLES, **{"block_0/query/kernel": ("in", "in", "out"), "block_1/query/kernel": ("in", "in", "out")}
    )
    lora = lj.init(jax.random.key(0), PARAMS, CONFIG, roles=bad_roles)
    with pytest.raises(
        ValueError,
        match=r"adapters contradict how the model uses their kernels:\n"
        r"  'block_0/query/kernel': the adapter has roles \('in', 'in', 'out'\), "
        r"the model uses its kernel \(24, 2, 12\) as \('in', 'out', 'out'\)\n"
        r"  'block_1/query/kernel'.*\nCreate adapters with roles=lj\.axis_roles",
    ):
        lj.wrap(MODEL.apply, compute="factored")({"params": PARAMS, "lora": lora}, IDS)


def test_axis_roles_rejects_what_it_cannot_trace():
    with pytest.raises(TypeError, match=r"lora_jax\.axis_roles: expected a Linen module, an NNX model, or a function"):
        lj.axis_roles("model", IDS)
    with pytest.raises(TypeError, match=r"found function and no sample inputs"):
        lj.axis_roles(lambda p, x: x)


@pytest.mark.slow
def test_a_kernel_stacked_along_a_non_leading_axis():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(_ScanLayer, variable_axes={"params": 1}, split_rngs={"params": True}, length=3)
            return scan(name="layers")(x, None)[0]

    model, x = Odd(), jax.random.normal(jax.random.key(0), (2, D))
    roles = lj.axis_roles(model, x)
    assert roles == {"layers/dense/kernel": ("in", "stack", "out")}
    params = model.init(jax.random.key(1), x)["params"]
    lora = randomize(lj.init(jax.random.key(2), params, lj.LoraConfig(rank=2), roles=roles), jax.random.key(3))
    y = lj.wrap(model.apply, compute="factored")({"params": params, "lora": lora}, x)
    np.testing.assert_allclose(y, model.apply({"params": lj.apply_lora(params, lora)}, x), rtol=1e-5, atol=1e-6)
