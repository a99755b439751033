"""The engine: layers nobody registered (subclasses, einsum and dot_general on a kernel, PyTorch-layout
kernels, tied heads) train factored, with the merged model's values and gradients."""

import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import leaf_pairs, randomize
from flax import nnx

import lora_jax as lj

D, T = 12, 3  # 6 tokens: no activation shares a kernel's shape
X = jax.random.normal(jax.random.key(0), (2, T, D))


class MyDense(nn.Dense):
    """A subclass of nn.Dense: found along the MRO."""


class OwnEinsum(nn.Module):
    """A custom layer calling jnp.einsum on its own kernel."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 2, 5))
        return jnp.einsum("btd,dhf->bthf", x, kernel)


class OwnDotGeneral(nn.Module):
    """A custom layer calling lax.dot_general on its own kernel."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Flax Conv1D: the kernel stored (out, in), transposed before use."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.2), (self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return jax.lax.dot_general(x, kernel.T, (((x.ndim - 1,), (0,)), ((), ()))) + bias


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(MyDense(D, name="sub")(x))
        h = jnp.tanh(Conv1D(D, name="c_attn")(h))  # square: a transposition would not show in shapes
        h = jnp.tanh(OwnEinsum(name="heads")(h)).reshape(h.shape[:-1] + (10,))
        return OwnDotGeneral(7, name="proj")(h)


MODEL = Net()
PARAMS = MODEL.init(jax.random.key(1), X)["params"]
ROLES = lj.axis_roles(MODEL, X)


def _lora():
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=".*/kernel")
    return randomize(lj.init(jax.random.key(2), PARAMS, cfg, roles=ROLES), jax.random.key(3), 0.3)


def _loss(out):
    return jnp.mean(jnp.sin(out) ** 2)


def test_axis_roles_of_custom_layers():
    assert ROLES == {
        "sub/kernel": ("in", "out"),
        "c_attn/kernel": ("out", "in"),  # (out, in): never taken for the default 2-D roles
        "heads/kernel": ("in", "out", "out"),
        "proj/kernel": ("in", "out"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_custom_layers_train_factored_with_values_and_gradients_of_the_merged_path(jit):
    lora = _lora()
    apply = lj.wrap(MODEL.apply, compute="factored")
    factored = lambda ad: _loss(apply({"params": PARAMS, "lora": ad}, X))
    merged = lambda ad: _loss(MODEL.apply({"params": lj.apply_lora(PARAMS, ad)}, X))
    grad = jax.jit(jax.value_and_grad(factored)) if jit else jax.value_and_grad(factored)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no merge warning: every layer is factored
        value, grads = grad(lora)
    want_value, want_grads = jax.value_and_grad(merged)(lora)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in leaf_pairs(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_no_base_weight_gradient_in_the_compiled_step():
    lora = _lora()
    apply = lj.wrap(MODEL.apply, compute="factored")
    factored = jax.grad(lambda ad: _loss(apply({"params": PARAMS, "lora": ad}, X)))
    full = jax.grad(lambda p: _loss(MODEL.apply({"params": p}, X)))
    hlo_fact = jax.jit(factored).lower(lora).compile().as_text()
    hlo_full = jax.jit(full).lower(PARAMS).compile().as_text()
    for shape in ("12,12", "12,2,5", "10,7"):  # the kernels' own shapes (a, b are thin)
        # Any op computing a kernel-shaped result; the kernel itself only enters as a constant or
        # parameter, or is moved by layout ops (older XLA versions write a conv's weight
        # gradient as reverse(...), newer ones as a dot, convolution or fusion).
        kernel_grad = re.compile(rf"f32\[{shape}\]\{{[0-9,]*\}} (?!constant|parameter|bitcast|copy|transpose)[\w-]+\(")
        assert kernel_grad.search(hlo_full), shape  # the check can see a weight gradient
        assert not kernel_grad.search(hlo_fact), shape


def test_transposed_kernel_with_default_roles_is_refused():
    """A square (out, in) kernel adapted as (in, out) would train and export transposed."""
    lora = randomize(lj.init(jax.random.key(2), PARAMS, lj.LoraConfig(rank=2, targets="c_attn/kernel")), jax.random.key(3))
    with pytest.raises(
        ValueError,
        match=r"'c_attn/kernel': the adapter has roles \('in', 'out'\), the model uses its kernel \(12, 12\) "
        r"as \('out', 'in'\) only",
    ):
        lj.wrap(MODEL.apply, compute="factored")({"params": PARAMS, "lora": lora}, X)


def test_a_use_that_cannot_be_factored_is_merged_there_with_a_warning():
    class Scaled(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", nn.initializers.normal(0.3), (D, D))
            return x @ kernel + x @ (kernel * kernel)  # an elementwise use beside a factored one

    model = Scaled()
    params = model.init(jax.random.key(0), X)["params"]
    lora = randomize(lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2)), jax.random.key(2))
    with pytest.warns(UserWarning, match=r"(?s)cannot be computed factored.*\n  'kernel': mul"):
        y = lj.wrap(model.apply, compute="factored")({"params": params, "lora": lora}, X)
    np.testing.assert_allclose(y, model.apply({"params": lj.apply_lora(params, lora)}, X), rtol=1e-5, atol=1e-6)


class TiedLM(nn.Module):
    """Hugging Face's tied heads: the embedding handed to a Dense from outside the params tree."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(16, D, name="wte")
        h = nn.Dense(D, name="mlp")(embed(ids))
        return nn.Dense(16, use_bias=False, name="lm_head").apply({"params": {"kernel": embed.embedding.T}}, h)


@pytest.mark.slow
def test_tied_head_kernel_outside_the_params_is_skipped():
    ids = jnp.array([[1, 2, 3]])
    model = TiedLM()
    roles = lj.axis_roles(model, ids)
    assert roles == {"wte/embedding": ("in", "out"), "mlp/kernel": ("in", "out")}
    params = model.init(jax.random.key(0), ids)["params"]
    # Only the MLP: the head reads the embedding's base value directly, beside any adapter (see README).
    lora = randomize(lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2, targets="mlp/kernel")), jax.random.key(2))
    y = lj.wrap(model.apply, compute="factored")({"params": params, "lora": lora}, ids)
    np.testing.assert_allclose(y, model.apply({"params": lj.apply_lora(params, lora)}, ids), rtol=1e-5, atol=1e-5)


class EncoderDecoder(nn.Module):
    def setup(self):
        self.enc = nn.Dense(D)
        self.dec = nn.Dense(D)

    def encode(self, x):
        return self.enc(x)

    def __call__(self, x):
        return self.dec(self.encode(x))


def test_calling_one_half_of_a_model_with_strict_false():
    model = EncoderDecoder()
    params = model.init(jax.random.key(0), X)["params"]
    lora = randomize(lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2)), jax.random.key(2))
    variables = {"params": params, "lora": lora}
    with pytest.raises(ValueError, match=r"(?s)never uses in this call:\n  'dec/kernel'.*strict=False"):
        lj.wrap(model.apply, compute="factored")(variables, X, method="encode")
    y = lj.wrap(model.apply, strict=False, compute="factored")(variables, X, method="encode")
    want = model.apply({"params": lj.apply_lora(params, lora)}, X, method="encode")
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


# ---- models nobody here wrote: Tunix's Gemma attention, tied heads, any function --------------


class TunixEinsum(nnx.Module):
    """Tunix's own ``Einsum`` layer (gemma/layers.py): a parameter ``w`` and an equation."""

    def __init__(self, shape, rngs):
        self.w = nnx.Param(0.3 * jax.random.normal(rngs.params(), shape))

    def __call__(self, eqn, x):
        return jnp.einsum(eqn, x, self.w[...])


class TunixAttention(nnx.Module):
    """Tunix's Gemma 3 attention projections: q, k and v stacked in one kernel, the output einsum."""

    def __init__(self, rngs, features=8, heads=2, head_dim=4):
        self.q_einsum = TunixEinsum((heads, features, head_dim), rngs)
        self.kv_einsum = TunixEinsum((2, heads, features, head_dim), rngs)
        self.attn_vec_einsum = TunixEinsum((heads, head_dim, features), rngs)

    def __call__(self, x):
        q = self.q_einsum("BTD,NDH->BTNH", x)
        k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        logits = jnp.einsum("BTNH,BSNH->BTSN", q, k)
        h = jnp.einsum("BTSN,BSNH->BTNH", jax.nn.softmax(logits, axis=2), v)
        return self.attn_vec_einsum("BTNH,NHD->BTD", h)


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_tunix_attention_without_registration_or_roles(jit):
    model = TunixAttention(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    roles = lj.axis_roles(model, x)
    assert roles == {
        "q_einsum/w": ("out", "in", "out"),
        "kv_einsum/w": ("out", "out", "in", "out"),
        "attn_vec_einsum/w": ("in", "in", "out"),
    }
    graphdef, state = nnx.split(model)
    lora = randomize(lj.init(jax.random.key(1), state, lj.LoraConfig(rank=2, targets=".*/w"), roles=roles),
                     jax.random.key(2), 0.3)
    apply = lj.wrap(graphdef, compute="factored")
    loss = lambda ad: _loss(apply(state, ad, x))
    merged = lambda ad: _loss(nnx.merge(graphdef, lj.apply_lora(state, ad))(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every use is factored
        value, grads = (jax.jit(jax.value_and_grad(loss)) if jit else jax.value_and_grad(loss))(lora)
    want_value, want_grads = jax.value_and_grad(merged)(lora)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_tunix_stacked_kv_kernel_with_a_stack_axis_by_hand():
    """Roles given by hand override the traced ones: k and v get separate adapters (PEFT can name them)."""
    model = TunixAttention(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    graphdef, state = nnx.split(model)
    roles = dict(lj.axis_roles(model, x), **{"kv_einsum/w": ("stack", "out", "in", "out")})
    lora = randomize(lj.init(jax.random.key(1), state, lj.LoraConfig(rank=2, targets="kv_einsum/w"), roles=roles),
                     jax.random.key(2), 0.3)
    assert lora["kv_einsum"]["w"].a.shape == (2, 8, 2) and lora["kv_einsum"]["w"].b.shape == (2, 2, 2, 4)
    apply = lj.wrap(graphdef, compute="factored")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = apply(state, lora, x)
    want = nnx.merge(graphdef, lj.apply_lora(state, lora))(x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_factored_step_flops_are_below_the_merged_steps():
    """A wide attention block: the factored step computes no weight gradient of the base."""
    model = TunixAttention(nnx.Rngs(0), features=256, heads=4, head_dim=64)
    x = jax.random.normal(jax.random.key(0), (4, 64, 256))
    graphdef, state = nnx.split(model)
    lora = lj.init(jax.random.key(1), state, lj.LoraConfig(rank=8, targets=".*/w"), roles=lj.axis_roles(model, x))
    flops = {}
    for mode in ("factored", "merged"):
        apply = lj.wrap(graphdef, compute=mode)
        flops[mode] = _flops(jax.grad(lambda ad, s: jnp.sum(apply(s, ad, x) ** 2)), lora, state)  # noqa: B023
    assert flops["factored"] <= 0.75 * flops["merged"], flops


class TiedEmbedding(nn.Module):
    """One table for the lookup and the output head (Gemma 3's embedder: ``decode`` is ``h @ E.T``)."""

    vocab: int = 40

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, D, name="embedder")
        h = jnp.tanh(nn.Dense(D, name="mlp")(embed(ids)))
        return embed.attend(h)


@pytest.mark.slow
def test_a_tied_embedding_adapter_changes_the_lookup_and_the_head_factored():
    model, ids = TiedEmbedding(), jnp.array([[1, 2, 3, 39], [0, 5, 5, 7]])
    params = model.init(jax.random.key(0), ids)["params"]
    assert lj.axis_roles(model, ids)["embedder/embedding"] == ("in", "out")  # the lookup comes first
    cfg = lj.LoraConfig(rank=2, targets="embedder/embedding")
    lora = randomize(lj.init(jax.random.key(1), params, cfg), jax.random.key(2), 0.3)
    apply = lj.wrap(model.apply, compute="factored")
    loss = lambda ad: _loss(apply({"params": params, "lora": ad}, ids))
    merged = lambda ad: _loss(model.apply({"params": lj.apply_lora(params, ad)}, ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, grads = jax.value_and_grad(loss)(lora)
    want_value, want_grads = jax.value_and_grad(merged)(lora)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    # Both uses see the adapter: changing only the lookup or only the head gives other logits.
    base = model.apply({"params": params}, ids)
    assert not np.allclose(apply({"params": params, "lora": lora}, ids), base)
    # No (vocab, features) weight gradient in the compiled step.
    hlo = jax.jit(jax.grad(loss)).lower(lora).compile().as_text()
    hlo_full = jax.jit(jax.grad(lambda p: _loss(model.apply({"params": p}, ids)))).lower(params).compile().as_text()
    kernel_grad = re.compile(r"f32\[40,12\]\{[0-9,]*\} (?!constant|parameter|bitcast|copy|transpose)[\w-]+\(")
    assert kernel_grad.search(hlo_full)
    assert not kernel_grad.search(hlo)


def _program(params, x, flag):
    """A plain function: checkpoint, cond, a while loop and a transposed kernel, all on one kernel."""
    w = params["w"]

    @jax.checkpoint
    def layer(h):
        return jnp.tanh(h @ w)

    h = jax.lax.cond(flag, layer, lambda h: h @ w.T.T, x)
    h = jax.lax.fori_loop(0, 3, lambda i, h: layer(h), h)
    return jax.lax.dot_general(h, params["head"], (((1,), (1,)), ((), ())))  # head stored (out, in)


@pytest.mark.slow
@pytest.mark.parametrize("flag", [True, False])
def test_a_plain_function_through_checkpoint_cond_and_while(flag):
    params = {"w": jax.random.normal(jax.random.key(0), (D, D)) / 3, "head": jax.random.normal(jax.random.key(1), (5, D))}
    x = jax.random.normal(jax.random.key(2), (4, D))
    roles = lj.axis_roles(_program, params, x, flag)
    assert roles == {"w": ("in", "out"), "head": ("out", "in")}
    lora = randomize(lj.init(jax.random.key(3), params, lj.LoraConfig(rank=2, targets="w|head"), roles=roles), jax.random.key(4), 0.3)
    apply = lj.wrap(_program, compute="factored")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.value_and_grad(lambda ad: _loss(apply(params, ad, x, flag)))(lora)
    want = jax.value_and_grad(lambda ad: _loss(_program(lj.apply_lora(params, ad), x, flag)))(lora)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)


class VmappedBlocks(nnx.Module):
    """Blocks created by nnx.vmap and run by nnx.scan (Flax's own scan-over-layers recipe)."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return nnx.Linear(D, D, rngs=rngs)

        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, block):
            return jnp.tanh(block(x))

        return step(x, self.blocks)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_nnx_vmap_and_scan_blocks_eagerly_and_jitted(jit):
    model = VmappedBlocks(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, D))
    assert lj.axis_roles(model, x) == {"blocks/kernel": ("stack", "in", "out")}
    graphdef, state = nnx.split(model)
    lora = randomize(lj.init(jax.random.key(1), state, lj.LoraConfig(rank=2), roles=lj.axis_roles(model, x)),
                     jax.random.key(2), 0.3)
    apply = lj.wrap(graphdef, compute="factored")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = (jax.jit(apply) if jit else apply)(state, lora, x)
    np.testing.assert_allclose(y, nnx.merge(graphdef, lj.apply_lora(state, lora))(x), rtol=1e-5, atol=1e-6)
