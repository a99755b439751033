"""The adapter-kind seam: a second kind, defined here and nowhere in lora_jax, trains,
merges, unmerges, saves, loads, shards and is summarised through the generic functions."""

import dataclasses
import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP, leaf_pairs, randomize
from jax.sharding import PartitionSpec as P

import lora_jax as lj


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class GainLoRA:
    """LoRA plus a trained gain per output feature: ``W' = W·diag(g) + s·a b``. Like DoRA it
    rescales the base output, so its factored output is ``g ⊙ base(x) + s·(x a) b``."""

    a: Any
    b: Any
    g: Any
    rank: int = dataclasses.field(metadata=dict(static=True))
    alpha: float = dataclasses.field(metadata=dict(static=True))
    roles: tuple = dataclasses.field(default=("in", "out"), metadata=dict(static=True))

    @property
    def scale(self):
        return self.alpha / self.rank


def _product(ad):
    return ad.scale * (ad.a.astype(jnp.float32) @ ad.b.astype(jnp.float32))


lj.extend.register_kind(
    GainLoRA,
    lj.extend.Kind(
        name="test_gain_lora",
        axes=lambda ad: {"a": (0, None), "b": (None, 1), "g": (1,)},
        merge=lambda w, ad: w * ad.g + _product(ad),
        unmerge=lambda w, ad: (w - _product(ad)) / ad.g,
        output=lambda layer, base, kernel, ad, dropout: base * ad.g.astype(base.dtype)
        + lj.extend.lowrank(layer, ad.a, ad.b, ad.scale, dropout=dropout).astype(base.dtype),
    ),
)

MODEL = MLP(hidden=16, out=3)
X = jax.random.normal(jax.random.key(1), (5, 8))
Y = jnp.sin(3 * X[:, :3])
PARAMS = MODEL.init(jax.random.key(0), X)["params"]


def _gain_adapters(seed=0):
    lora = randomize(lj.init(jax.random.key(seed), PARAMS, lj.LoraConfig(rank=2, alpha=4)), jax.random.key(seed + 1))
    return jax.tree.map(
        lambda ad: GainLoRA(ad.a, ad.b, 1.0 + 0.1 * ad.b[0], rank=ad.rank, alpha=ad.alpha),
        lora,
        is_leaf=lambda x: isinstance(x, lj.Adapter),
    )


def test_factored_forward_equals_the_merge_and_rescales_the_base():
    gain = _gain_adapters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # factored, not merged
        y = lj.wrap(MODEL.apply, compute="factored")({"params": PARAMS, "lora": gain}, X)
    np.testing.assert_allclose(y, MODEL.apply({"params": lj.apply_lora(PARAMS, gain)}, X), rtol=1e-5, atol=1e-6)
    # An independent float64 reference of the merge.
    w = np.asarray(PARAMS["fc1"]["kernel"], np.float64)
    ad = gain["fc1"]["kernel"]
    want = w * np.asarray(ad.g, np.float64) + ad.scale * np.asarray(ad.a, np.float64) @ np.asarray(ad.b, np.float64)
    np.testing.assert_allclose(lj.apply_lora(PARAMS, gain)["fc1"]["kernel"], want, rtol=1e-5, atol=1e-6)
    back = lj.unmerge(lj.apply_lora(PARAMS, gain), gain)
    np.testing.assert_allclose(back["fc1"]["kernel"], PARAMS["fc1"]["kernel"], rtol=1e-5, atol=1e-5)


def test_trains_through_wrap_and_optimizer():
    apply = lj.wrap(MODEL.apply, compute="factored")
    variables = {"params": PARAMS, "lora": _gain_adapters()}
    tx = lj.optimizer(optax.adam(3e-2))
    loss = lambda v: jnp.mean((apply(v, X) - Y) ** 2)

    @jax.jit
    def step(variables, state):
        grads = jax.grad(loss)(variables)
        updates, state = tx.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state

    state, first, g0 = tx.init(variables), loss(variables), variables["lora"]["fc2"]["kernel"].g
    for _ in range(30):
        variables, state = step(variables, state)
    assert loss(variables) < 0.7 * first
    assert not np.allclose(variables["lora"]["fc2"]["kernel"].g, g0)  # the gain trains
    for got, want in leaf_pairs(variables["params"], PARAMS):
        np.testing.assert_array_equal(got, want)


def test_save_load_summary_and_shardings(tmp_path):
    gain = _gain_adapters()
    lj.save(tmp_path / "gain.safetensors", gain)
    back = lj.load(tmp_path / "gain.safetensors")
    assert isinstance(back["fc1"]["kernel"], GainLoRA)
    for got, want in leaf_pairs(back, gain):
        np.testing.assert_array_equal(got, want)
    s = lj.summary(PARAMS, gain)
    assert s.trainable_params == sum(2 * i + 2 * o + o for i, o in [(8, 16), (16, 3)])
    assert {t.kind for t in s.targets} == {"test_gain_lora"}
    shard = lj.adapter_shardings({"fc1": {"kernel": P("fsdp", "tensor")}, "fc2": {"kernel": P()}}, gain)
    assert (shard["fc1"]["kernel"].a, shard["fc1"]["kernel"].b, shard["fc1"]["kernel"].g) == (
        P("fsdp", None), P(None, "tensor"), P("tensor"),
    )  # fmt: skip


def test_a_kind_without_a_plain_lora_form_is_not_exported_to_peft(tmp_path):
    with pytest.raises(ValueError, match=r"'fc1/kernel': a GainLoRA \(test_gain_lora\) has no plain LoRA form for PEFT"):
        lj.to_peft(tmp_path, _gain_adapters())
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_register_kind_bad_input():
    with pytest.raises(TypeError, match=r"lora_jax\.extend\.register_kind: cls must be a dataclass type"):
        lj.extend.register_kind(int, lj.extend.kind_of(GainLoRA))
    with pytest.raises(ValueError, match=r"the name 'lora' is taken by Adapter"):
        lj.extend.register_kind(GainLoRA, lj.extend.kind_of(lj.Adapter))
    with pytest.raises(TypeError, match=r"str is not an adapter kind"):
        lj.extend.kind_of("a")
    with pytest.raises(TypeError, match=r"register_kind: .*NotAPytree is not a pytree node; decorate it with "
                                        r"@jax.tree_util.register_dataclass"):  # fmt: skip

        @dataclasses.dataclass(frozen=True)
        class NotAPytree:
            g: Any

        lj.extend.register_kind(NotAPytree, lj.extend.Kind(name="test_not_a_pytree", axes=lambda ad: {"g": (1,)},
                                             merge=lambda w, ad: w, unmerge=None))  # fmt: skip


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Gain:
    """IA³-like: a trained gain per output feature, ``W' = W·diag(g)``; its one array follows
    the kernel's out axes only, so the kernel's in size is not known from the adapter."""

    g: Any
    roles: tuple = dataclasses.field(default=("in", "out"), metadata=dict(static=True))


def _gain_in_kernel_layout(ad):
    return jnp.expand_dims(ad.g, tuple(i for i, r in enumerate(ad.roles) if r == "in"))


def _gain_output(layer, base, kernel, ad, dropout):
    place = lj.extend.per_output(layer, ad.roles)
    if place is None:
        raise ValueError("a gain per output feature needs a use whose output features are the kernel's out axes")
    return base * place(ad.g).astype(base.dtype)


lj.extend.register_kind(
    Gain,
    lj.extend.Kind(
        name="test_gain",
        axes=lambda ad: {"g": tuple(i for i, r in enumerate(ad.roles) if r == "out")},
        merge=lambda w, ad: w * _gain_in_kernel_layout(ad),
        unmerge=lambda w, ad: w / _gain_in_kernel_layout(ad),
        output=_gain_output,
        create=lambda lora, kernel: Gain(
            jnp.ones([n for n, r in zip(kernel.shape, lora.roles) if r == "out"], lora.a.dtype), roles=lora.roles
        ),
    ),
)


@pytest.mark.slow
def test_a_kind_defined_outside_lora_jax_from_config_to_export(tmp_path):
    """The IA³-like kind above, registered here only: made by init from the config, trained
    factored under jit, merged, saved, loaded and exported as merged parameters."""
    config = lj.LoraConfig(kind="test_gain", rank=1)
    gains = lj.init(jax.random.key(0), PARAMS, config)
    assert isinstance(gains["fc1"]["kernel"], Gain) and gains["fc1"]["kernel"].g.shape == (16,)
    chex.assert_trees_all_equal(lj.apply_lora(PARAMS, gains), PARAMS)  # a fresh gain changes nothing
    apply = lj.wrap(MODEL.apply)  # compute="auto": a kind without a cost model is factored
    loss = lambda lora, params: jnp.mean((apply({"params": params, "lora": lora}, X) - Y) ** 2)
    merged_loss = lambda lora, params: jnp.mean((MODEL.apply({"params": lj.apply_lora(params, lora)}, X) - Y) ** 2)
    tx = optax.adam(5e-2)  # on the adapters alone

    @jax.jit
    def step(lora, state, params):
        grads = jax.grad(loss)(lora, params)
        updates, state = tx.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every use factored: no merge warning
        chex.assert_trees_all_close(jax.grad(loss)(gains, PARAMS), jax.grad(merged_loss)(gains, PARAMS),
                                    rtol=1e-5, atol=1e-7)  # fmt: skip
        state, first = tx.init(gains), loss(gains, PARAMS)
        trained = gains
        for _ in range(40):
            trained, state = step(trained, state, PARAMS)
    assert loss(trained, PARAMS) < 0.8 * first
    # Merged against an independent float64 reference: each column of W times its gain.
    merged = lj.apply_lora(PARAMS, trained)
    for name in ("fc1", "fc2"):
        w, g = (np.asarray(x, np.float64) for x in (PARAMS[name]["kernel"], trained[name]["kernel"].g))
        np.testing.assert_allclose(merged[name]["kernel"], w * g[None, :], rtol=1e-6)
    np.testing.assert_allclose(apply({"params": PARAMS, "lora": trained}, X), MODEL.apply({"params": merged}, X),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    lj.save(tmp_path / "gain.safetensors", trained)
    back = lj.load(tmp_path / "gain.safetensors")
    chex.assert_trees_all_equal(back, trained)
    lj.save_params(tmp_path / "merged.safetensors", PARAMS, trained)
    chex.assert_trees_all_close(lj.load_params(tmp_path / "merged.safetensors"), merged, rtol=1e-6)
    with pytest.raises(ValueError, match=r"'fc1/kernel': a Gain \(test_gain\) has no plain LoRA form for PEFT"):
        lj.to_peft(tmp_path / "peft", trained)
    assert not (tmp_path / "peft").exists()


def test_a_kind_whose_arrays_follow_some_kernel_axes_only(tmp_path):
    gains = {name: {"kernel": Gain(1.0 + 0.1 * jnp.arange(n, dtype=jnp.float32))} for name, n in (("fc1", 16), ("fc2", 3))}
    merged = lj.apply_lora(PARAMS, gains)
    np.testing.assert_allclose(merged["fc2"]["kernel"], np.asarray(PARAMS["fc2"]["kernel"]) * np.asarray(gains["fc2"]["kernel"].g))
    y = lj.wrap(MODEL.apply, compute="factored")({"params": PARAMS, "lora": gains}, X)
    np.testing.assert_allclose(y, MODEL.apply({"params": merged}, X), rtol=1e-5, atol=1e-6)
    lj.save(tmp_path / "gain.safetensors", gains)
    back = lj.load(tmp_path / "gain.safetensors")
    np.testing.assert_array_equal(back["fc1"]["kernel"].g, gains["fc1"]["kernel"].g)
    assert lj.summary(PARAMS, gains).trainable_params == 16 + 3
    wrong = {"fc2": {"kernel": Gain(jnp.ones(4))}}
    with pytest.raises(ValueError, match=r"'fc2/kernel': the kernel has shape \(16, 3\), the adapter .* fits shape \(None, 4\)"):
        lj.apply_lora(PARAMS, wrong)
