"""The NNX front end: wrap(model) / axis_roles(model) on Flax NNX models, functional style."""

import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import leaf_pairs, randomize
from flax import nnx

import lora_jax as lj

IDS = jnp.array([[1, 2, 3, 4, 5], [0, 9, 8, 7, 6]])  # 10 tokens


class Net(nnx.Module):
    """Every built-in NNX layer type: Embed (call and attend), attention projections
    (LinearGeneral), Linear in an nnx.List, Conv, Einsum."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 6, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=4, decode=False, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(6, 6, rngs=rngs) for _ in range(2)])
        self.conv = nnx.Conv(6, 7, kernel_size=(3,), rngs=rngs)
        self.ein = nnx.Einsum("btd,dhk->bthk", (7, 2, 3), rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = h + self.attn(self.norm(h))
        for layer in self.layers:
            h = jnp.tanh(layer(h))
        y = self.ein(self.conv(h))
        return jnp.sum(y, axis=(-1, -2)) + self.embed.attend(h).mean(-1)


MODEL = Net(nnx.Rngs(0))
GRAPHDEF, STATE = nnx.split(MODEL)
ROLES = lj.axis_roles(MODEL, IDS)
CONFIG = lj.LoraConfig(rank=2, alpha=4, targets=r".*/(kernel|embedding)")


def _lora(seed=1):
    return randomize(lj.init(jax.random.key(seed), STATE, CONFIG, roles=ROLES), jax.random.key(seed + 1), 0.3)


def _merged(lora, ids=IDS):
    return nnx.merge(GRAPHDEF, lj.apply_lora(STATE, lora))(ids)


def test_axis_roles_of_every_layer_type():
    assert ROLES == {
        "embed/embedding": ("in", "out"),
        "attn/query/kernel": ("in", "out", "out"),
        "attn/key/kernel": ("in", "out", "out"),
        "attn/value/kernel": ("in", "out", "out"),
        "attn/out/kernel": ("in", "in", "out"),
        "layers/0/kernel": ("in", "out"),
        "layers/1/kernel": ("in", "out"),
        "conv/kernel": ("in", "in", "out"),
        "ein/kernel": ("in", "out", "out"),
    }


@pytest.mark.slow
def test_fresh_adapter_is_a_no_op():
    fresh = lj.init(jax.random.key(0), STATE, CONFIG, roles=ROLES)
    np.testing.assert_array_equal(lj.wrap(MODEL, compute="factored")(STATE, fresh, IDS), MODEL(IDS))


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_factored_equals_merged_values_and_gradients(jit):
    lora = _lora()
    apply = lj.wrap(GRAPHDEF, compute="factored")  # a GraphDef works as well as the model
    loss = lambda ad: jnp.mean(jnp.sin(apply(STATE, ad, IDS)) ** 2)
    merged_loss = lambda ad: jnp.mean(jnp.sin(_merged(ad)) ** 2)
    grad = jax.jit(jax.value_and_grad(loss)) if jit else jax.value_and_grad(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer factored
        value, grads = grad(lora)
    want_value, want_grads = jax.value_and_grad(merged_loss)(lora)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in leaf_pairs(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert type(MODEL.layers[0]) is nnx.Linear  # the caller's model is untouched


@pytest.mark.slow
def test_no_base_weight_gradient_in_the_compiled_step():
    lora = _lora()
    apply = lj.wrap(MODEL, compute="factored")
    factored = jax.grad(lambda ad: jnp.mean(apply(STATE, ad, IDS) ** 2))
    full = jax.grad(lambda st: jnp.mean(nnx.merge(GRAPHDEF, st)(IDS) ** 2))
    hlo_fact = jax.jit(factored).lower(lora).compile().as_text()
    hlo_full = jax.jit(full).lower(STATE).compile().as_text()
    for shape in ("6,6", "3,6,7", "7,2,3"):  # Linear, Conv and Einsum kernels
        # Any op computing a kernel-shaped result; the kernel itself only enters as a constant or
        # parameter, or is moved by layout ops (older XLA versions write a conv's weight
        # gradient as reverse(...), newer ones as a dot, convolution or fusion).
        kernel_grad = re.compile(rf"f32\[{shape}\]\{{[0-9,]*\}} (?!constant|parameter|bitcast|copy|transpose)[\w-]+\(")
        assert kernel_grad.search(hlo_full), shape
        assert not kernel_grad.search(hlo_fact), shape


@pytest.mark.slow
def test_step_flops_below_full_finetuning_and_merged_at_a_realistic_width():
    """XLA's own FLOP count (not timed): rank 8 on width 256, 512 tokens."""
    mlp = nnx.Sequential(nnx.Linear(256, 1024, rngs=nnx.Rngs(0)), nnx.gelu, nnx.Linear(1024, 256, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(mlp)
    x = jax.random.normal(jax.random.key(0), (2, 256, 256))
    lora = lj.init(jax.random.key(1), state, lj.LoraConfig(rank=8))
    apply = lj.wrap(mlp, compute="factored")
    flops = lambda f, arg: jax.jit(jax.grad(f)).lower(arg).compile().cost_analysis()["flops"]
    full = flops(lambda st: jnp.mean(nnx.merge(graphdef, st)(x) ** 2), state)
    factored = flops(lambda ad: jnp.mean(apply(state, ad, x) ** 2), lora)
    merged = flops(lambda ad: jnp.mean(nnx.merge(graphdef, lj.apply_lora(state, ad))(x) ** 2), lora)
    assert factored < 0.75 * full and factored < merged


@pytest.mark.slow
def test_functional_training_step():
    apply = lj.wrap(MODEL, compute="factored")
    target = jnp.linspace(-1, 1, 10).reshape(2, 5)
    lora = lj.init(jax.random.key(3), STATE, CONFIG, roles=ROLES)
    tx = optax.adam(3e-2)

    @jax.jit
    def step(lora, opt_state):
        loss, grads = jax.value_and_grad(lambda ad: jnp.mean((apply(STATE, ad, IDS) - target) ** 2))(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    opt_state, losses = tx.init(lora), []
    for _ in range(25):
        lora, opt_state, loss = step(lora, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    np.testing.assert_allclose(apply(STATE, lora, IDS), _merged(lora), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dropout_needs_a_key_and_acts_on_the_branch_only():
    lora = randomize(lj.init(jax.random.key(0), STATE, lj.LoraConfig(rank=2, targets=".*/kernel", dropout=0.5), roles=ROLES), jax.random.key(1))
    apply = lj.wrap(MODEL, compute="factored")
    with pytest.raises(ValueError, match=r"lora_training=True needs lora_rng"):
        apply(STATE, lora, IDS, lora_training=True)
    y1 = apply(STATE, lora, IDS, lora_training=True, lora_rng=jax.random.key(5))
    y2 = apply(STATE, lora, IDS, lora_training=True, lora_rng=jax.random.key(6))
    assert not np.allclose(y1, y2, atol=1e-4)
    np.testing.assert_allclose(apply(STATE, lora, IDS), _merged(lora), rtol=1e-5, atol=1e-5)  # off by default


class Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class Scanned(nnx.Module):
    def __init__(self, rngs, remat=False):
        self.remat = remat

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        call = nnx.remat(lambda block, x: block(x)) if self.remat else (lambda block, x: block(x))

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return call(block, x)

        return self.head(body(x, self.blocks))


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_layers_stacked_by_vmap_and_called_in_scan_and_remat_are_factored(remat):
    model = Scanned(nnx.Rngs(0), remat=remat)
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(3), (2, 4))
    roles = lj.axis_roles(model, x)
    assert roles == {"blocks/lin/kernel": ("stack", "in", "out"), "head/kernel": ("in", "out")}
    lora = randomize(lj.init(jax.random.key(1), state, lj.LoraConfig(rank=2), roles=roles), jax.random.key(2))
    apply = lj.wrap(model, compute="factored")
    loss = lambda ad: jnp.sum(apply(state, ad, x) ** 2)
    merged_loss = lambda ad: jnp.sum(nnx.merge(graphdef, lj.apply_lora(state, ad))(x) ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # factored inside the transforms, not merged
        value, grads = jax.jit(jax.value_and_grad(loss))(lora)
    want_value, want_grads = jax.value_and_grad(merged_loss)(lora)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in leaf_pairs(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    hlo = jax.jit(jax.grad(loss)).lower(lora).compile().as_text()
    assert not re.search(r"f32\[3,4,4\]\{[0-9,]*\} (dot|fusion)\(", hlo)  # no stacked kernel gradient


class TwoHeads(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(4, 3, rngs=rngs)
        self.b = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.a(x)


def test_unused_adapters_and_strict():
    model = TwoHeads(nnx.Rngs(0))
    _, state = nnx.split(model)
    lora = randomize(lj.init(jax.random.key(1), state, lj.LoraConfig(rank=2)), jax.random.key(2))
    with pytest.raises(ValueError, match=r"never uses in this call:\n  'b/kernel'"):
        lj.wrap(model, compute="factored")(state, lora, jnp.ones((1, 4)))
    y = lj.wrap(model, strict=False, compute="factored")(state, lora, jnp.ones((1, 4)))
    np.testing.assert_allclose(y, nnx.merge(*nnx.split(model)[:1], lj.apply_lora(state, lora))(jnp.ones((1, 4))), rtol=1e-5)


def test_bad_input():
    lora = _lora()
    with pytest.raises(TypeError, match=r"takes \(state, lora, \*inputs\) with state from nnx.split\(model\); found a dict"):
        lj.wrap(MODEL, compute="factored")({"params": 1}, lora, IDS)
    with pytest.raises(TypeError, match=r"found a method of the NNX model Net; pass the model itself: lj.wrap\(model\)"):
        lj.wrap(MODEL.__call__, compute="factored")
    with pytest.raises(TypeError, match=r"found the Linen model Dense itself; pass its apply: lj.wrap\(model.apply\)"):
        lj.wrap(nn.Dense(3), compute="factored")
    with pytest.raises(TypeError, match=r"pass the NNX model itself"):
        lj.axis_roles(GRAPHDEF, IDS)
    wrong = dict(lora, layers={0: {"kernel": lj.Adapter(jnp.ones((6, 2)), jnp.ones((2, 6)), rank=2, alpha=1.0, roles=("out", "in"))}, 1: lora["layers"][1]})
    with pytest.raises(ValueError, match=r"'layers/0/kernel': the adapter has roles \('out', 'in'\), the model uses its kernel \(6, 6\) as \('in', 'out'\) only"):
        lj.wrap(MODEL, compute="factored")(STATE, wrong, IDS)
    with pytest.raises(ValueError, match=r"adapters do not fit params:\n  'ghost/kernel': no such parameter"):
        lj.wrap(MODEL, compute="factored")(STATE, {"ghost": {"kernel": lora["layers"][0]["kernel"]}}, IDS)


@pytest.mark.slow
def test_stateful_style_trains_the_same_adapters_as_the_functional_style():
    target = jnp.linspace(-1, 1, 10).reshape(2, 5)
    tx = optax.adam(3e-2)
    lora0 = lj.init(jax.random.key(3), STATE, CONFIG, roles=ROLES)
    apply = lj.wrap(MODEL, compute="factored")

    @jax.jit
    def step(lora, opt_state):
        grads = jax.grad(lambda ad: jnp.mean((apply(STATE, ad, IDS) - target) ** 2))(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    lora, opt_state = lora0, tx.init(lora0)
    for _ in range(5):
        lora, opt_state = step(lora, opt_state)

    model = nnx.merge(GRAPHDEF, STATE)  # a model of its own: attach changes it in place
    lj.attach(model, lora0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def stateful_step(model, optimizer):
        loss = lambda m: jnp.mean((m(IDS) - target) ** 2)
        optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))

    for _ in range(5):
        stateful_step(model, optimizer)
    n_adapter = sum(x.size for x in jax.tree.leaves(lora0))
    # adam's mu and nu for the adapter arrays only, its count and the optimizer's step
    assert sum(x.size for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState))) == 2 * n_adapter + 2
    with pytest.raises(ValueError, match=r"already has adapters attached"):
        lj.attach(model, lora0)
    trained = lj.detach(model)
    assert jax.tree.structure(trained) == jax.tree.structure(lora)
    for got, want in leaf_pairs(trained, lora):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert type(model.layers[0]) is nnx.Linear and not hasattr(model.layers[0], "kernel__lora")
    for got, want in leaf_pairs(nnx.state(model), STATE):  # base untouched
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"the model has no adapters attached"):
        lj.detach(model)


def test_attach_bad_input():
    model = nnx.merge(GRAPHDEF, STATE)
    with pytest.raises(TypeError, match=r"lora_jax\.attach: model must be a Flax NNX Module, found dict"):
        lj.attach({}, _lora())
    with pytest.raises(ValueError, match=r"lora_jax\.attach: adapters do not fit params:\n  'ghost/kernel'"):
        lj.attach(model, {"ghost": {"kernel": _lora()["layers"][0]["kernel"]}})
    norm_only = lj.init(jax.random.key(0), STATE, lj.LoraConfig(rank=2, targets="layers/0/kernel", trainable="norm/scale"))
    with pytest.raises(ValueError, match=r"'norm/scale': a FullWeight has no factored form"):
        lj.attach(model, norm_only)
    assert type(model.layers[0]) is nnx.Linear  # nothing half-attached


@pytest.mark.slow
def test_scanned_layers_do_not_copy_the_stacked_base():
    """MaxText once copied a stacked base per scan step; XLA's own memory analysis says the
    factored step needs about what the forward pass needs, far less than the stack."""

    class Wide(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(512, 512, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.lin(x))

    class Deep(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=8)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Wide(rngs)

            self.blocks = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            return body(x, self.blocks)

    model = Deep(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jnp.ones((4, 512))
    lora = lj.init(jax.random.key(0), state, lj.LoraConfig(rank=8), roles=lj.axis_roles(model, x))
    apply = lj.wrap(model, compute="factored")
    memory = lambda f, arg: jax.jit(f).lower(arg).compile().memory_analysis().temp_size_in_bytes
    step = memory(jax.grad(lambda ad: jnp.sum(apply(state, ad, x) ** 2)), lora)
    forward = memory(lambda st: jnp.sum(nnx.merge(graphdef, st)(x) ** 2), state)
    stack = 8 * 512 * 512 * 4
    adapters = sum(a.nbytes for a in jax.tree.leaves(lora))
    activations = 8 * 2 * x.size * 4  # each layer's input and output, kept for the backward pass
    assert step <= 1.05 * forward + 3 * adapters + activations  # plus adapters and their gradients
    assert step < stack / 4  # not one copy of the stacked base


def test_an_nnx_module_bridged_into_linen_is_factored():
    from flax.nnx import bridge

    class Inner(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])

        def __call__(self, x):
            for layer in self.layers:
                x = jnp.tanh(layer(x))
            return x

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return bridge.ToLinen(Inner)(nn.Dense(4)(x))

    model, x = Outer(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    lora = randomize(lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2)), jax.random.key(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the engine reaches the bridged NNX layers: nothing is merged
        y = lj.wrap(model.apply, compute="factored")({"params": params, "lora": lora}, x)
    np.testing.assert_allclose(y, model.apply({"params": lj.apply_lora(params, lora)}, x), rtol=1e-5, atol=1e-6)


def test_init_reads_roles_off_an_nnx_models_layers():
    """No roles to pass for built-in layers: init(key, model, config) equals init with traced roles."""
    from_model = lj.init(jax.random.key(1), MODEL, CONFIG)
    from_state = lj.init(jax.random.key(1), STATE, CONFIG, roles=ROLES)
    assert jax.tree.structure(from_model) == jax.tree.structure(from_state)
    for u, v in leaf_pairs(from_model, from_state):
        np.testing.assert_array_equal(u, v)
    scanned = Scanned(nnx.Rngs(0))
    lora = lj.init(jax.random.key(1), scanned, lj.LoraConfig(rank=2))
    assert lora["blocks"]["lin"]["kernel"].roles == ("stack", "in", "out")
    assert lj.axis_roles(scanned, jnp.ones((2, 4)))["blocks/lin/kernel"] == ("stack", "in", "out")


@pytest.mark.slow
def test_an_attached_model_under_wrap_with_another_adapter_tree():
    """An attached model (its base frozen by stop_gradient inside) called through a wrap of
    its graphdef with a second adapter tree: both adapters apply, the second factored, and
    its gradients equal those of the model merged with both (issue 22: was a KeyError, then
    zero gradients)."""
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    plain_graph, plain_state = nnx.split(model)
    base = nnx.state(model, nnx.Param)
    first = randomize(lj.init(jax.random.key(0), base, lj.LoraConfig(rank=2)), jax.random.key(1))
    second = randomize(lj.init(jax.random.key(5), base, lj.LoraConfig(rank=3)), jax.random.key(6))
    x = jax.random.normal(jax.random.key(3), (2, 8))

    def want(second):
        return jnp.sum(nnx.merge(plain_graph, lj.apply_lora(lj.apply_lora(plain_state, first), second))(x) ** 2)

    lj.attach(model, first)
    graph, state = nnx.split(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # factored: no merged use
        got = jax.value_and_grad(lambda second: jnp.sum(lj.wrap(graph)(state, second, x) ** 2))(second)
    np.testing.assert_allclose(got[0], want(second), rtol=1e-5)
    chex.assert_trees_all_close(got[1], jax.grad(want)(second), rtol=1e-4, atol=1e-5)
