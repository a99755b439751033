import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj


def _setup(mlp, **config):
    model, params, x = mlp
    cfg = lj.LoraConfig(rank=2, **config)
    variables = {"params": params, "lora": lj.init(jax.random.key(0), params, cfg)}
    tx = lj.optimizer(optax.adam(1e-2))
    return model, variables, x, tx


def _loss(model, x, y):
    def loss(variables):
        merged = lj.apply_lora(variables["params"], variables["lora"])
        return jnp.mean((model.apply({"params": merged}, x) - y) ** 2)

    return loss


def test_state_only_for_adapters(mlp):
    _, variables, _, tx = _setup(mlp)
    state = tx.init(variables)
    adapter_arrays = jax.tree.leaves(variables["lora"])
    state_arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    # adam: mu and nu for each adapter array, nothing for any base array.
    assert sorted(x.shape for x in state_arrays) == sorted(2 * [x.shape for x in adapter_arrays])
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * sum(x.size for x in adapter_arrays) + 1


@pytest.mark.parametrize("jit", [False, True])
def test_training_lowers_loss_and_leaves_base_bit_identical(mlp, jit):
    model, variables, x, tx = _setup(mlp)
    y = jnp.sin(x[:, :3] * 3)
    loss = _loss(model, x, y)

    def step(variables, state):
        value, grads = jax.value_and_grad(loss)(variables)
        updates, state = tx.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state, value

    step = jax.jit(step) if jit else step
    base = jax.tree.map(np.array, variables["params"])
    state, first = tx.init(variables), loss(variables)
    for _ in range(60):
        variables, state, _ = step(variables, state)
    assert loss(variables) < 0.7 * first
    for got, want in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(base)):
        np.testing.assert_array_equal(got, want)
    assert np.abs(np.asarray(variables["lora"]["fc1"]["kernel"].b)).max() > 0  # b trains
    assert not np.array_equal(
        variables["lora"]["fc1"]["kernel"].a, lj.init(jax.random.key(0), base, lj.LoraConfig(rank=2))["fc1"]["kernel"].a
    )  # a trains too


def test_trainable_base_subtree_like_modules_to_save(mlp):
    """Parameters trained fully ride in the adapter tree: the optimizer needs no second list."""
    model, variables, x, tx = _setup(mlp, targets="fc1/kernel", trainable=r"fc2/.*")
    head = variables["lora"]["fc2"]
    assert isinstance(head["kernel"], lj.FullWeight) and isinstance(head["bias"], lj.FullWeight)
    np.testing.assert_array_equal(head["kernel"].value, variables["params"]["fc2"]["kernel"])
    state = tx.init(variables)
    n_lora = sum(a.size for a in jax.tree.leaves(variables["lora"]))
    n_head = sum(a.size for a in jax.tree.leaves(variables["params"]["fc2"]))
    assert n_lora == n_head + sum(a.size for a in jax.tree.leaves(variables["lora"]["fc1"]))
    assert sum(a.size for a in jax.tree.leaves(state)) == 2 * n_lora + 1
    grads = jax.grad(_loss(model, x, jnp.ones((5, 3))))(variables)
    updates, _ = tx.update(grads, state, variables)
    assert np.abs(np.asarray(updates["lora"]["fc2"]["kernel"].value)).max() > 0
    assert not any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates["params"]))


def test_other_collections_are_frozen(mlp):
    _, variables, _, tx = _setup(mlp)
    variables = dict(variables, batch_stats={"mean": jnp.ones(4)})
    grads = jax.tree.map(jnp.ones_like, variables)
    updates, _ = tx.update(grads, tx.init(variables), variables)
    assert not np.any(np.asarray(updates["batch_stats"]["mean"]))


def test_not_a_variables_dict(mlp):
    _, variables, _, tx = _setup(mlp)
    with pytest.raises(
        TypeError,
        match=r"expected the variables dict \{'params': base, 'lora': adapters\}, "
        r"found a dict with keys \['params'\]",
    ):
        tx.init({"params": variables["params"]})
    with pytest.raises(TypeError, match=r"found a list"):
        tx.init([1])


def test_trainable_matching_nothing(mlp):
    with pytest.raises(ValueError, match=r"(?s)lora_jax\.init: invalid targets\.\ntrainable matched no parameter.*'fc1/bias'"):
        _setup(mlp, trainable="head/.*")


def test_trainable_and_target_at_once(mlp):
    with pytest.raises(ValueError, match=r"both targets and trainable.*\n  'fc2/kernel'"):
        _setup(mlp, trainable="fc2/kernel")


def test_bad_trainable_pattern():
    with pytest.raises(ValueError, match=r"lora_jax\.LoraConfig: trainable pattern '\(' is not a valid regex"):
        lj.LoraConfig(trainable="(")


def test_trainable_keyword_moved_to_the_config():
    """One source of truth: the optimizer and wrap no longer take their own list."""
    with pytest.raises(TypeError, match=r"lora_jax\.optimizer: trainable= moved to LoraConfig\(trainable=\.\.\.\)"):
        lj.optimizer(optax.sgd(0.1), trainable="head/.*")
