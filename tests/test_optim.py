import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import leaf_pairs

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


@pytest.mark.slow
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
    for got, want in leaf_pairs(variables["params"], base):
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



@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("dora", [False, True])
def test_loraplus_groups_the_arrays_as_peft_does(dora):
    """Each array's learning rate (read off adam's first step, -lr per entry for a gradient of
    ones) is the learning rate of its parameter group in PEFT's create_loraplus_optimizer."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.head = torch.nn.Embedding(10, 6), torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)

    targets = ["fc"] if dora else ["emb", "fc"]
    config = peft.LoraConfig(r=2, target_modules=targets, modules_to_save=["head"], use_dora=dora)
    net = peft.get_peft_model(Net(), config)
    torch_opt = create_loraplus_optimizer(net, torch.optim.Adam, lr=1e-3, loraplus_lr_ratio=8.0)
    lr_of = {id(p): group["lr"] for group in torch_opt.param_groups for p in group["params"]}
    want = {name: lr_of[id(p)] for name, p in net.named_parameters() if p.requires_grad}

    params = {"emb": {"embedding": jnp.zeros((10, 6))}, "fc": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)},
              "head": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros(3)}}  # fmt: skip
    cfg = lj.LoraConfig(rank=2, targets="fc/kernel" if dora else "(emb/embedding|fc/kernel)", trainable="head/.*",
                        use_dora=dora)  # fmt: skip
    variables = {"params": params, "lora": lj.init(jax.random.key(0), params, cfg)}
    tx = lj.optimizer(lj.loraplus(optax.adam, learning_rate=1e-3, ratio=8.0))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, variables), tx.init(variables), variables)
    lora = updates["lora"]
    got = {
        "base_model.model.fc.lora_A.default.weight": lora["fc"]["kernel"].a,
        "base_model.model.fc.lora_B.default.weight": lora["fc"]["kernel"].b,
        "base_model.model.head.modules_to_save.default.weight": lora["head"]["kernel"].value,
        "base_model.model.head.modules_to_save.default.bias": lora["head"]["bias"].value,
    }
    if dora:
        got["base_model.model.fc.lora_magnitude_vector.default.weight"] = lora["fc"]["kernel"].m
    else:
        got["base_model.model.emb.lora_embedding_A.default"] = lora["emb"]["embedding"].a
        got["base_model.model.emb.lora_embedding_B.default"] = lora["emb"]["embedding"].b
    assert sorted(got) == sorted(want)
    for name, update in got.items():
        np.testing.assert_allclose(-np.asarray(update), want[name], rtol=1e-4, err_msg=name)


def test_loraplus_bad_ratio_and_schedules():
    with pytest.raises(ValueError, match="ratio must be a finite number > 0 .*found 0"):
        lj.loraplus(optax.adam, learning_rate=1e-3, ratio=0)
    with pytest.raises(ValueError, match="ratio must be a finite number > 0 .*found inf"):
        lj.loraplus(optax.adam, learning_rate=1e-3, ratio=float("inf"))  # b would become -inf
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0 .*found nan"):
        lj.loraplus(optax.adam, learning_rate=float("nan"), ratio=16)
    with pytest.raises(TypeError, match="make must be a function learning_rate -> optax transformation"):
        lj.loraplus("adam", learning_rate=1e-3, ratio=16)
    lj.loraplus(optax.adam, learning_rate=np.float32(1e-3), ratio=np.float32(16))  # numpy numbers are numbers
    params = {"dense": {"kernel": jnp.zeros((4, 3))}}
    lora = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2))
    tx = lj.loraplus(optax.sgd, learning_rate=optax.constant_schedule(0.1), ratio=4.0)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, lora), tx.init(lora), lora)
    np.testing.assert_allclose(updates["dense"]["kernel"].b, -0.4)
    np.testing.assert_allclose(updates["dense"]["kernel"].a, -0.1)
