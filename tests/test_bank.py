"""Adapter banks: the mixed-batch forward (each example its own adapter) against merged models
and PEFT's mixed-batch inference, per-slot gradients and optimizer state, swaps without
retracing, building/reading/editing banks, files, and bad input."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP, leaf_pairs, randomize, torch_mlp
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj

RANKS = (2, 4, 3)


def _adapters(params, ranks=RANKS, seed=0, roles=None, **config):
    def one(i, r):
        config_i = lj.LoraConfig(rank=r, alpha=2.0 * r + 1, **config)
        return randomize(lj.init(jax.random.key(seed + i), params, config_i, roles=roles), jax.random.key(50 + seed + i))

    return [one(i, r) for i, r in enumerate(ranks)]


def _per_example(apply_merged, params, trees, x, index):
    """The reference: example e through the model merged with its own adapter (or the base)."""
    rows = [apply_merged(lj.apply_lora(params, trees[i]) if i >= 0 else params, x[e : e + 1]) for e, i in enumerate(index)]
    return np.concatenate([np.asarray(r) for r in rows])


@pytest.fixture
def setup():
    model = MLP(out=6)
    x = jax.random.normal(jax.random.key(1), (6, 3, 8))
    params = model.init(jax.random.key(0), x)["params"]
    trees = _adapters(params)
    return model, params, x, trees


INDEX = [0, 2, -1, 1, 0, 2]


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_each_example_gets_its_own_adapter(setup, jit):
    model, params, x, trees = setup
    apply = lj.wrap(model.apply)
    run = lambda v, x, i: apply(v, x, lora_index=i)
    run = jax.jit(run) if jit else run
    got = run({"params": params, "lora": lj.bank(trees, rank=6)}, x, jnp.array(INDEX))
    want = _per_example(lambda p, x: model.apply({"params": p}, x), params, trees, x, INDEX)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    base_rows = np.asarray(model.apply({"params": params}, x[2:3]))
    np.testing.assert_array_equal(np.asarray(got[2:3]), base_rows)  # lj.BASE: the base model, bit for bit


@pytest.mark.slow
def test_adapters_of_different_kernels_and_rslora(setup):
    model, params, x, _ = setup
    only_fc1 = _adapters(params, ranks=(3,), seed=7, targets="fc1/kernel")[0]
    rs = _adapters(params, ranks=(5,), seed=9, use_rslora=True)[0]
    trees = [only_fc1, rs]
    b = lj.bank(trees)
    assert b["fc2"]["kernel"].scales[0] == 0  # absent from adapter 0: an empty slot
    index = [1, 0, 0, -1, 1, 1]
    got = lj.wrap(model.apply)({"params": params, "lora": b}, x, lora_index=jnp.array(index))
    want = _per_example(lambda p, x: model.apply({"params": p}, x), params, trees, x, index)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        emb = nn.Embed(11, 8, name="emb")
        h = emb(x)

        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + nn.tanh(nn.Dense(8, name="mix")(h)), None

        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="blocks")(h, None)
        return nn.Conv(4, (3,), name="conv")(h)


@pytest.mark.slow
def test_scanned_embedding_and_conv_layers():
    model = Scanned()
    ids = jax.random.randint(jax.random.key(2), (5, 7), 0, 11)
    params = model.init(jax.random.key(0), ids)["params"]
    roles = lj.axis_roles(model, ids)
    trees = _adapters(params, ranks=(2, 3), targets=".*(embedding|kernel)", roles=roles)
    b = lj.bank(trees, rank=4)
    assert b["blocks"]["mix"]["kernel"].a.shape == (3, 2, 8, 4)  # the stack axis stays leading
    index = [1, -1, 0, 1, 0]
    got = lj.wrap(model.apply)({"params": params, "lora": b}, ids, lora_index=jnp.array(index))
    want = _per_example(lambda p, x: model.apply({"params": p}, x), params, trees, ids, index)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1, self.fc2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


@pytest.mark.slow
def test_nnx_functional_and_attached():
    model = NnxMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    trees = _adapters(state, ranks=(2, 3))
    index = [1, 0, -1, 1]
    merged = lambda s, x: nnx.merge(graphdef, s)(x)
    want = _per_example(merged, state, trees, x, index)
    b = lj.bank(trees)
    got = jax.jit(lambda s, b, x, i: lj.wrap(graphdef)(s, b, x, lora_index=i))(state, b, x, jnp.array(index))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    lj.attach(model, b)
    with lj.bank_index(jnp.array(index)):
        np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-6)


def _loss(model):
    apply = lj.wrap(model.apply)
    return lambda v, x, i: jnp.sum(apply(v, x, lora_index=i) ** 2)


@pytest.mark.slow
def test_each_slot_is_trained_by_its_own_examples_only(setup):
    model, params, x, trees = setup
    b = lj.bank(trees, rank=5)
    index = jnp.array([0, 0, -1, 2, 2, 0])  # slot 1 has no example
    grads = jax.grad(_loss(model))({"params": params, "lora": b}, x, index)["lora"]
    for k, tree in enumerate(trees):
        rows = np.flatnonzero(np.asarray(index) == k)
        for layer in ("fc1", "fc2"):
            g = grads[layer]["kernel"]
            if len(rows) == 0:
                assert not np.asarray(g.a[k]).any() and not np.asarray(g.b[k]).any()  # exactly zero
                continue
            want = jax.grad(lambda t, rows=rows: _loss(model)({"params": params, "lora": t}, x[rows], None))(tree)
            r = tree[layer]["kernel"].rank
            np.testing.assert_allclose(g.a[k][:, :r], want[layer]["kernel"].a, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(g.b[k][:r], want[layer]["kernel"].b, rtol=1e-4, atol=1e-5)
            assert not np.asarray(g.a[k][:, r:]).any() and not np.asarray(g.b[k][r:]).any()  # padding stays zero
        assert not np.asarray(grads["fc1"]["kernel"].scales).any()  # scales are not trained


@pytest.mark.slow
def test_optimizer_keeps_unused_slots_and_their_state_exactly(setup):
    model, params, x, trees = setup
    tx = lj.optimizer(optax.adamw(1e-2, weight_decay=0.1))
    loss = _loss(model)

    @jax.jit
    def step(v, state, index, keep):
        grads = jax.grad(loss)(v, x, index)
        updates, state = tx.update(grads, state, v, lora_index=index) if keep else tx.update(grads, state, v)
        return optax.apply_updates(v, updates), state

    step = jax.jit(step.__wrapped__, static_argnums=3)
    v = {"params": params, "lora": lj.bank(trees)}
    state = tx.init(v)
    assert len(jax.tree.leaves(state)) == 1 + 2 * 4  # count, mu and nu of a and b: no state for the scales
    v1, s1 = step(v, state, jnp.array([0, 1, 2, 0, 1, 2]), True)
    v2, s2 = step(v1, s1, jnp.array([1, 1, -1, 1, 1, 1]), True)
    leaves = lambda t, k: [np.asarray(x)[k] for x in jax.tree.leaves(t["lora"])]
    mus = lambda s, k: [np.asarray(x)[k] for x in jax.tree.leaves(s.inner_states["train"].inner_state[0].mu["lora"])]
    for k in (0, 2):
        for before, after in zip(leaves(v1, k) + mus(s1, k), leaves(v2, k) + mus(s2, k)):
            np.testing.assert_array_equal(before, after)
    assert any((x != y).any() for x, y in zip(leaves(v1, 1), leaves(v2, 1)))
    v3, _ = step(v1, s1, jnp.array([1, 1, -1, 1, 1, 1]), False)  # without the index: decay moves slot 0
    assert any((x != y).any() for x, y in zip(leaves(v1, 0), leaves(v3, 0)))


@pytest.mark.slow
def test_swapping_adapters_does_not_retrace(setup):
    model, params, x, trees = setup
    apply = lj.wrap(model.apply)

    @jax.jit
    @chex.assert_max_traces(n=1)  # ten swaps and index changes below, one trace
    def forward(lora, index):
        return apply({"params": params, "lora": lora}, x, lora_index=index)

    b = lj.bank(trees, rank=6)
    index = jnp.array([0, 1, 2, 0, 1, 2])
    forward(b, index)
    for swap in range(10):  # other ranks (1..6) and alphas into slot 1, and other indices
        new = _adapters(params, ranks=(swap % 6 + 1,), seed=100 + swap)[0]
        b = lj.bank_set(b, 1, new)
        got = forward(b, jnp.roll(index, swap))
        i = np.roll(np.asarray(index), swap)
        want = _per_example(lambda p, x: model.apply({"params": p}, x), params, [trees[0], new, trees[2]], x, i)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_read_back_exactly_and_edit(setup):
    _, params, _, trees = setup
    b = lj.bank(trees, rank=6)
    for k, tree in enumerate(trees):
        back = lj.bank_get(b, k)
        for layer in ("fc1", "fc2"):
            got, want = back[layer]["kernel"], tree[layer]["kernel"]
            assert (got.rank, got.alpha, got.roles) == (want.rank, want.alpha, want.roles)
            np.testing.assert_array_equal(got.a, want.a)
            np.testing.assert_array_equal(got.b, want.b)
    odd = lj.init(jax.random.key(3), params, lj.LoraConfig(rank=3, alpha=7.0))  # 7/3: not exact in float32
    assert lj.bank_get(lj.bank([odd]), 0)["fc1"]["kernel"].alpha == 7.0
    emptied = lj.bank_set(b, 1, None)
    assert lj.bank_get(emptied, 1) == {}
    grown = lj.bank_add(b, trees[0])
    assert grown["fc1"]["kernel"].size == 4
    np.testing.assert_array_equal(lj.bank_get(grown, 3)["fc2"]["kernel"].b, trees[0]["fc2"]["kernel"].b)
    shrunk = lj.bank_remove(b, 0)
    assert shrunk["fc1"]["kernel"].size == 2
    np.testing.assert_array_equal(lj.bank_get(shrunk, 0)["fc1"]["kernel"].a, trees[1]["fc1"]["kernel"].a)


def test_banks_from_files_save_load_and_summary(setup, tmp_path):
    _, params, _, trees = setup
    lj.save(tmp_path / "one.safetensors", trees[0])
    lj.to_peft(tmp_path / "two", trees[1])
    b = lj.bank([tmp_path / "one.safetensors", tmp_path / "two", trees[2]], params=params)
    for k in range(3):
        np.testing.assert_allclose(lj.bank_get(b, k)["fc1"]["kernel"].a, trees[k]["fc1"]["kernel"].a, rtol=1e-6)
    lj.save(tmp_path / "bank.safetensors", b)
    loaded = lj.load(tmp_path / "bank.safetensors")
    for got, want in leaf_pairs(loaded, b):
        np.testing.assert_array_equal(got, want)
    s = lj.summary(params, b)
    assert s.trainable_params == sum(x.size for n, x in _arrays(b) if n != "scales")


def _arrays(b):
    return [(name, getattr(leaf, name)) for leaf in jax.tree.leaves(b, is_leaf=lambda x: isinstance(x, lj.Bank))
            for name in ("a", "b", "scales")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.interop
def test_mixed_batch_equals_peft(setup, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model, params, x, trees = setup

    net = torch_mlp(params)
    b = lj.bank(trees, rank=6)
    names = ["alice", "bob", "carol"]
    lj.bank_to_peft(tmp_path, b, names=names)
    peft_model = peft.PeftModel.from_pretrained(net, tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(tmp_path / name, adapter_name=name)
    want = peft_model(torch.tensor(np.asarray(x)), adapter_names=[names[i] if i >= 0 else "__base__" for i in INDEX])
    got = lj.wrap(model.apply)({"params": params, "lora": b}, x, lora_index=jnp.array(INDEX))
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_bad_input(setup):
    model, params, x, trees = setup
    b = lj.bank(trees)
    apply = lj.wrap(model.apply)
    v = {"params": params, "lora": b}
    with pytest.raises(ValueError, match=r"'fc1/kernel' \(dot_general\).*index holds \[3, 7\], outside the bank's slots 0..2"):
        apply(v, x, lora_index=jnp.array([0, 3, 7, 0, 0, 0]))
    with pytest.raises(ValueError, match="needs the adapter of each example: pass lora_index="):
        apply(v, x)
    with pytest.raises(ValueError, match="index has 2 entries but the layer's input has 6 examples"):
        apply(v, x, lora_index=jnp.array([0, 1]))
    with pytest.raises(TypeError, match="1-D integer array"):
        apply(v, x, lora_index=jnp.zeros(6))
    out = jax.jit(lambda i: apply(v, x, lora_index=i))(jnp.array([0, 9, 0, 0, 0, 0]))
    assert np.isnan(out[1]).all() and not np.isnan(out[0]).any()  # under jit: NaN, never another adapter
    small = {"fc1": {"kernel": jnp.zeros((4, 16))}}
    misfit = lj.init(jax.random.key(0), small, lj.LoraConfig(rank=2))
    wrong = lj.bank([misfit])
    with pytest.raises(ValueError, match="fc1/kernel"):
        apply({"params": params, "lora": wrong}, x, lora_index=jnp.zeros(6, int))
    with pytest.raises(ValueError, match=r"rank 5 is above the bank's rank 4"):
        lj.bank_set(b, 0, _adapters(params, ranks=(5,))[0])
    with pytest.raises(ValueError, match="'extra/kernel': the bank has no slot for this kernel"):
        lj.bank_set(b, 0, {**trees[0], "extra": {"kernel": trees[0]["fc1"]["kernel"]}})
    with pytest.raises(IndexError, match="slot 3 is out of range for a bank of 3 slots"):
        lj.bank_get(b, 3)
    with pytest.raises(ValueError, match="rank 2 is below the largest rank of the adapters, 4"):
        lj.bank(trees, rank=2)
    with pytest.raises(ValueError, match="'fc1/kernel' disagree on its kernel"):
        lj.bank([trees[0], misfit])
    with pytest.raises(TypeError, match="adapters\\[1\\]: 'fc1/kernel' is a Bank"):
        lj.bank([trees[0], wrong])
    with pytest.raises(ValueError, match="no one merged kernel"):
        lj.apply_lora(params, b)
    with pytest.raises(ValueError, match="lj.bank_to_peft"):
        lj.to_peft("unused", b)
    with pytest.raises(ValueError, match="names must be 3 distinct directory names"):
        lj.bank_to_peft("unused", b, names=["a", "a", "b"])
    with pytest.raises(ValueError, match="PEFT directory; pass params="):
        lj.bank([trees[0], "."])
    with pytest.raises(TypeError, match="non-empty list"):
        lj.bank([])
    with pytest.raises(ValueError, match="the 2 adapter trees adapt no kernel"):
        lj.bank([{}, {}])


@pytest.mark.slow
def test_slots_and_indices_are_checked_wherever_they_are_used(setup):
    """-1 is lj.BASE in an index and no slot; a slot or index outside the bank is an error where
    it can be checked and NaN under jit (never a silent no-op); lora_index needs a bank."""
    model, params, x, trees = setup
    b = lj.bank(trees)
    for fn in (lambda i: lj.bank_get(b, i), lambda i: lj.bank_set(b, i, None), lambda i: lj.bank_remove(b, i)):
        with pytest.raises(IndexError, match=r"slot -1 is out of range for a bank of 3 slots 0\.\.2 \(-1 is lj\.BASE"):
            fn(-1)
        with pytest.raises(IndexError, match="slot 3 is out of range"):
            fn(3)
    # Under jit the slot cannot be checked: the written bank is NaN, not the old bank.
    out = jax.jit(lambda i: lj.bank_set(b, i, trees[0]))(10)
    assert all(bool(jnp.isnan(t).all()) for t in jax.tree.leaves(out))
    inside = jax.jit(lambda i: lj.bank_set(b, i, trees[0]))(1)
    chex.assert_trees_all_close(lj.bank_get(inside, 1), lj.bank_get(lj.bank_set(b, 1, trees[0]), 1))
    # The optimizer: an index outside the slots is refused, as in the forward.
    tx = lj.optimizer(optax.adam(1e-2))
    variables = {"params": params, "lora": b}
    state = tx.init(variables)
    grads = jax.tree.map(jnp.ones_like, variables)
    with pytest.raises(ValueError, match=r"lora_jax\.optimizer: lora_index: the adapter index holds \[5\], outside"):
        tx.update(grads, state, variables, lora_index=jnp.array([5, 5, 5, 5, 5, 5]))
    # lora_index with plain adapters is an error, not ignored.
    with pytest.raises(ValueError, match="lora_index= selects each example's slot of an adapter bank, but no adapter"):
        lj.wrap(model.apply)({"params": params, "lora": trees[0]}, x, lora_index=jnp.zeros(6, int))


@pytest.mark.slow
def test_a_bank_keeps_its_adapters_dropout(setup):
    """One LoRA dropout rate per kernel: in training each example's branch sees the same dropout
    as its adapter alone; bank_get returns it; adapters of other rates are refused."""
    model, params, x, _ = setup
    cfg = lambda seed, rate: lj.LoraConfig(rank=2, dropout=rate, targets="fc1/kernel")
    trees = [randomize(lj.init(jax.random.key(i), params, cfg(i, 0.25)), jax.random.key(10 + i)) for i in range(3)]
    b = lj.bank(trees)
    assert b["fc1"]["kernel"].dropout == 0.25 and lj.bank_get(b, 1)["fc1"]["kernel"].dropout == 0.25
    apply = lj.wrap(model.apply)
    rngs = {"dropout": jax.random.key(7)}
    train = apply({"params": params, "lora": b}, x, lora_index=jnp.full(6, 1), lora_training=True, rngs=rngs)
    alone = apply({"params": params, "lora": trees[1]}, x, lora_training=True, rngs=rngs)
    np.testing.assert_allclose(train, alone, rtol=1e-5, atol=1e-6)
    evaluation = apply({"params": params, "lora": b}, x, lora_index=jnp.full(6, 1))
    assert not np.allclose(train, evaluation)  # dropout acts in training
    other = randomize(lj.init(jax.random.key(5), params, cfg(5, 0.5)), jax.random.key(6))
    with pytest.raises(ValueError, match=r"'fc1/kernel' have LoRA dropout rates \{0: 0\.25, 1: 0\.5\}"):
        lj.bank([trees[0], other])
    with pytest.raises(ValueError, match=r"the adapter's LoRA dropout is 0\.5, the bank's 0\.25"):
        lj.bank_set(b, 0, other)


def test_a_bank_export_replaces_the_earlier_one_whole(setup, tmp_path):
    """Slots an earlier export had and the bank no longer has do not linger; a failure midway
    leaves the earlier export intact; a foreign directory is refused, not replaced."""
    import os

    model, params, x, trees = setup
    out = tmp_path / "bank"
    lj.bank_to_peft(out, lj.bank(trees), names=["a", "b", "c"])
    assert sorted(p for p in os.listdir(out) if not p.endswith(".json")) == ["a", "b", "c"]
    lj.bank_to_peft(out, lj.bank(trees[:2]), names=["a", "b"])
    assert sorted(p for p in os.listdir(out) if not p.endswith(".json")) == ["a", "b"]  # no stale 'c'
    before = {p: (out / p / "adapter_model.safetensors").read_bytes() for p in ("a", "b")}

    def failing(path):
        raise ValueError("name_map failed")

    with pytest.raises(ValueError, match="name_map failed"):
        lj.bank_to_peft(out, lj.bank(trees), names=["a", "b", "c"], name_map=failing)
    assert {p: (out / p / "adapter_model.safetensors").read_bytes() for p in ("a", "b")} == before
    assert not (out / "c").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not an earlier bank export"):
        lj.bank_to_peft(foreign, lj.bank(trees))
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_a_bank_trained_by_any_optax_transform_is_never_silently_rescaled(setup, tmp_path):
    """A bank's scales are data but frozen: lj.optimizer and lj.loraplus leave them exactly; a plain
    optax transform that moves them (weight decay) breaks the seal kept beside them, so the
    forward gives NaN for those slots under jit and every concrete use raises."""
    model, params, x, trees = setup
    b = lj.bank(trees, rank=5)
    loss = _loss(model)
    index = jnp.array([0, 0, -1, 2, 2, 1])

    def trained(tx, steps=2, whole=False):
        v = {"params": params, "lora": b}
        state = tx.init(v if whole else b)

        @jax.jit
        def step(v, state):
            grads = jax.grad(loss)(v, x, index)
            if whole:
                updates, state = tx.update(grads, state, v, lora_index=index)
                return optax.apply_updates(v, updates), state
            updates, state = tx.update(grads["lora"], state, v["lora"])
            return {"params": params, "lora": optax.apply_updates(v["lora"], updates)}, state

        for _ in range(steps):
            v, state = step(v, state)
        return v["lora"]

    frozen = lambda t: [np.asarray(getattr(t[k]["kernel"], n)) for k in ("fc1", "fc2") for n in ("scales", "ranks")]
    # LoRA+ alone, LoRA+ inside lj.optimizer with lora_index (its state holds optax.MaskedNode), Adam without decay.
    for tx, whole in ((lj.loraplus(optax.adamw, learning_rate=1e-2, ratio=4), False),
                      (lj.optimizer(lj.loraplus(lambda lr: optax.adamw(lr, weight_decay=0.1), learning_rate=1e-2, ratio=4)), True),
                      (optax.adam(1e-2), False)):  # fmt: skip
        new = trained(tx, whole=whole)
        for got, want in zip(frozen(new), frozen(b)):
            np.testing.assert_array_equal(got, want)
        assert not np.array_equal(new["fc1"]["kernel"].a, b["fc1"]["kernel"].a)
        assert lj.bank_get(new, 0)["fc1"]["kernel"].rank == trees[0]["fc1"]["kernel"].rank
    # Plain AdamW over the bank tree: its weight decay shrinks the scales with everything else.
    decayed = trained(optax.adamw(1e-2, weight_decay=0.1), steps=1)
    apply = lj.wrap(model.apply)
    y = jax.jit(lambda lora: apply({"params": params, "lora": lora}, x, lora_index=index))(decayed)
    assert np.isnan(np.asarray(y)[[0, 1, 3, 4, 5]]).all() and np.isfinite(np.asarray(y)[2]).all()  # BASE row finite
    match = r"the bank's frozen scales were changed .* an optimizer updated the whole bank tree"
    with pytest.raises(ValueError, match="lora_jax.wrap: " + match):
        apply({"params": params, "lora": decayed}, x, lora_index=index)
    with pytest.raises(ValueError, match=r"lora_jax.bank_get: 'fc1/kernel': " + match):
        lj.bank_get(decayed, 0)
    with pytest.raises(ValueError, match=match):
        lj.bank_to_peft(tmp_path / "out", decayed)
    assert not (tmp_path / "out").exists()


_FUZZ_MODEL = MLP(out=6)
_FUZZ_X = jax.random.normal(jax.random.key(1), (6, 3, 8))
_FUZZ_PARAMS = _FUZZ_MODEL.init(jax.random.key(0), _FUZZ_X)["params"]
_FUZZ_TREES = _adapters(_FUZZ_PARAMS)
_FUZZ_BANK = lj.bank(_FUZZ_TREES, rank=5)
_FUZZ_APPLY = lj.wrap(_FUZZ_MODEL.apply)
_FUZZ_JIT = jax.jit(lambda lora, index: _FUZZ_APPLY({"params": _FUZZ_PARAMS, "lora": lora}, _FUZZ_X, lora_index=index))
# Each slot (and the base, -1) over the whole batch, merged: row e of the reference is row e of its slot's.
_FUZZ_WANT = {i: np.asarray(_FUZZ_MODEL.apply({"params": lj.apply_lora(_FUZZ_PARAMS, t) if i >= 0 else _FUZZ_PARAMS},
                                              _FUZZ_X)) for i, t in [(-1, None), *enumerate(_FUZZ_TREES)]}  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-4, 6), max_size=8), jit=st.booleans())
def test_fuzzed_bank_indices_give_each_example_its_adapter_or_a_clear_error(values, jit):
    """Any index: one entry per example inside -1..2 gives each example its own slot's output;
    a wrong length is a ValueError; values outside the slots are a ValueError eagerly and NaN
    rows (only theirs) under jit."""
    index = jnp.asarray(values, jnp.int32)
    if len(values) != 6:
        with pytest.raises(ValueError, match="entries but the layer's input has 6 examples|outside the bank's slots"):
            (_FUZZ_JIT if jit else lambda b, i: _FUZZ_APPLY({"params": _FUZZ_PARAMS, "lora": b}, _FUZZ_X, lora_index=i))(_FUZZ_BANK, index)
        return
    inside = np.array([-1 <= v <= 2 for v in values])
    if not jit and not inside.all():
        with pytest.raises(ValueError, match=r"the adapter index holds \[.*\], outside the bank's slots 0\.\.2"):
            _FUZZ_APPLY({"params": _FUZZ_PARAMS, "lora": _FUZZ_BANK}, _FUZZ_X, lora_index=index)
        return
    got = np.asarray(_FUZZ_JIT(_FUZZ_BANK, index) if jit else
                     _FUZZ_APPLY({"params": _FUZZ_PARAMS, "lora": _FUZZ_BANK}, _FUZZ_X, lora_index=index))  # fmt: skip
    assert np.isnan(got[~inside]).all()
    want = [_FUZZ_WANT[v][e] for e, v in enumerate(values) if -1 <= v <= 2]  # none: every row is NaN (above)
    np.testing.assert_allclose(got[inside], np.reshape(want, got[inside].shape), rtol=1e-5, atol=1e-6)
