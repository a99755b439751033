"""The engine: layers nobody registered (subclasses, einsum and dot_general on a kernel, PyTorch-layout
kernels, tied heads) train factored, with the merged model's values and gradients."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize

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


@pytest.mark.parametrize("jit", [False, True])
def test_custom_layers_train_factored_with_values_and_gradients_of_the_merged_path(jit):
    lora = _lora()
    apply = lj.wrap(MODEL.apply, compute="factored")
    factored = lambda ad: _loss(apply({"params": PARAMS, "lora": ad}, X))  # noqa: E731
    merged = lambda ad: _loss(MODEL.apply({"params": lj.apply_lora(PARAMS, ad)}, X))  # noqa: E731
    grad = jax.jit(jax.value_and_grad(factored)) if jit else jax.value_and_grad(factored)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no merge warning: every layer is factored
        value, grads = grad(lora)
    want_value, want_grads = jax.value_and_grad(merged)(lora)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


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
