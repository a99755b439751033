"""DoRA: the factored forward against the merged kernel and a float64 NumPy reference, against
PEFT's DoRA on a PyTorch twin (outputs, gradients, merges; files both ways), and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MLP, Scanned, leaf_pairs, randomize

import lora_jax as lj
from lora_jax._kinds.lora import delta_spec

DORA = lj.LoraConfig(rank=3, alpha=5.0, use_dora=True)


def _trained(params, config=DORA, roles=None, seed=0):
    """A 'trained' DoRA tree: a, b random, m positive and away from ‖W‖."""
    tree = lj.init(jax.random.key(seed), params, config, roles=roles)
    tree = randomize(tree, jax.random.key(seed + 1), std=0.3)
    return jax.tree.map(lambda ad: lj.DoraAdapter(ad.a, ad.b, m=jnp.abs(ad.m) + 0.5, rank=ad.rank, alpha=ad.alpha,
                                                   roles=ad.roles, rslora=ad.rslora),
                        tree, is_leaf=lambda x: isinstance(x, lj.DoraAdapter))  # fmt: skip


def _reference_merge(w, ad):
    """m · V / ‖V‖ in float64, V = W + scale·ΔW, the norm over the kernel's in axes."""
    a, b = np.asarray(ad.a, np.float64), np.asarray(ad.b, np.float64)
    v = np.asarray(w, np.float64) + ad.scale * np.einsum(delta_spec(ad.roles), a, b)
    ins = tuple(i for i, r in enumerate(ad.roles) if r == "in")
    m = np.asarray(ad.m, np.float64).reshape([1 if r == "in" else n for n, r in zip(v.shape, ad.roles)])
    return m * v / np.sqrt(np.sum(v**2, axis=ins, keepdims=True))


class Mixed(nn.Module):
    """Dense with bias, DenseGeneral with 2 out axes and 2 in axes, a Conv."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 4), name="qkv")(x)  # (b, t, 2, 4)
        h = nn.DenseGeneral(6, axis=(-2, -1), name="out")(jnp.tanh(h))
        return nn.Conv(5, (3,), name="conv")(jnp.tanh(nn.Dense(6, name="fc")(h)))


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_factored_equals_merged_and_the_reference(jit):
    model = Mixed()
    x = jax.random.normal(jax.random.key(0), (2, 7, 8))
    params = model.init(jax.random.key(1), x)["params"]
    roles = lj.axis_roles(model, x)
    fresh = lj.init(jax.random.key(2), params, DORA, roles=roles)
    factored = lj.wrap(model.apply, compute="factored")
    run = jax.jit(factored) if jit else factored
    base = model.apply({"params": params}, x)
    # A fresh adapter: the base (exactly where ‖W‖ is recomputed the same way; under jit, to its rounding).
    np.testing.assert_allclose(run({"params": params, "lora": fresh}, x), base, rtol=1e-5 if jit else 0, atol=0)
    trained = _trained(params, roles=roles)
    merged = lj.apply_lora(params, trained)
    for layer in ("qkv", "out", "conv", "fc"):
        want = _reference_merge(params[layer]["kernel"], trained[layer]["kernel"])
        np.testing.assert_allclose(merged[layer]["kernel"], want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(run({"params": params, "lora": trained}, x), model.apply({"params": merged}, x),
                               rtol=1e-4, atol=1e-5)  # fmt: skip


@pytest.mark.slow
def test_gradients_treat_the_norm_as_a_constant():
    """Factored and merged-in-step give the same gradients, and the norm's is not among them: the
    gradient equals that of m·V/c with c = ‖V‖ computed outside the differentiation."""
    model = MLP(out=6)
    x = jax.random.normal(jax.random.key(0), (5, 8))
    params = model.init(jax.random.key(1), x)["params"]
    trained = _trained(params)
    def loss(ad, mode):
        return jnp.sum(lj.wrap(model.apply, compute=mode)({"params": params, "lora": ad}, x) ** 2)

    grads = {mode: jax.grad(loss)(trained, mode) for mode in ("factored", "merged")}
    for got, want in leaf_pairs(grads["factored"], grads["merged"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    norms = {k: np.linalg.norm(np.asarray(lj.apply_lora(params, {k: {"kernel": lj.Adapter(
        ad["kernel"].a, ad["kernel"].b, rank=3, alpha=5.0)}})[k]["kernel"]), axis=0) for k, ad in trained.items()}  # fmt: skip

    def constant_norm(ad):
        p = {k: dict(v) for k, v in params.items()}
        for k in ("fc1", "fc2"):
            d = ad[k]["kernel"]
            v = p[k]["kernel"] + d.scale * d.a @ d.b
            p[k]["kernel"] = d.m * v / norms[k]
        return jnp.sum(model.apply({"params": p}, x) ** 2)

    want = jax.grad(constant_norm)(trained)
    for got, ref in leaf_pairs(grads["factored"], want):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.interop
def test_a_lora_jax_dora_adapter_in_peft(twins, tmp_path):
    model, params, x, twin, torch, peft = twins
    trained = _trained(params)
    lj.to_peft(tmp_path, trained)
    net = peft.PeftModel.from_pretrained(twin(), tmp_path, is_trainable=True)
    xt = torch.tensor(np.asarray(x))
    ours = lj.wrap(model.apply)({"params": params, "lora": trained}, x)
    np.testing.assert_allclose(net(xt).detach().numpy(), ours, rtol=1e-5, atol=1e-5)
    # Gradients of the same loss, through PEFT's DoRA (torch autograd) and ours.
    torch.sum(net(xt) ** 2).backward()
    grads = jax.grad(lambda ad: jnp.sum(lj.wrap(model.apply)({"params": params, "lora": ad}, x) ** 2))(trained)
    for name in ("fc1", "fc2"):
        layer, g = getattr(net.base_model.model, name), grads[name]["kernel"]
        np.testing.assert_allclose(layer.lora_A["default"].weight.grad.numpy().T, g.a, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.lora_B["default"].weight.grad.numpy().T, g.b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.lora_magnitude_vector["default"].weight.grad.numpy(), g.m, rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


@pytest.mark.interop
def test_a_peft_dora_adapter_in_lora_jax_and_its_merge(twins, tmp_path):
    model, params, x, twin, torch, peft = twins
    torch.manual_seed(0)
    net = peft.get_peft_model(twin(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["fc1", "fc2"], use_dora=True))
    with torch.no_grad():  # "trained": every factor and magnitude moved
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    net.save_pretrained(tmp_path)
    lora = lj.from_peft(tmp_path, params)
    assert isinstance(lora["fc1"]["kernel"], lj.DoraAdapter)
    xt = torch.tensor(np.asarray(x))
    want = net(xt).detach().numpy()
    np.testing.assert_allclose(lj.wrap(model.apply)({"params": params, "lora": lora}, x), want, rtol=1e-5, atol=1e-5)
    merged = lj.apply_lora(params, lora)
    unloaded = net.merge_and_unload()
    for name in ("fc1", "fc2"):
        np.testing.assert_allclose(merged[name]["kernel"], getattr(unloaded, name).weight.detach().numpy().T,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_files_summary_and_shardings(tmp_path):
    params = {"dense": {"kernel": jnp.ones((8, 4))}}
    trained = _trained(params)
    lj.save(tmp_path / "dora.safetensors", trained)
    loaded = lj.load(tmp_path / "dora.safetensors")
    for got, want in leaf_pairs(loaded, trained):
        np.testing.assert_array_equal(got, want)
    assert lj.summary(params, trained).trainable_params == 8 * 3 + 3 * 4 + 4  # a, b and m
    from jax.sharding import PartitionSpec as P

    spec = lj.adapter_shardings({"dense": {"kernel": P("fsdp", "tp")}}, trained)["dense"]["kernel"]
    assert (spec.a, spec.b, spec.m) == (P("fsdp", None), P(None, "tp"), P("tp"))


@pytest.mark.slow
def test_bad_input(tmp_path):
    class WithEmbed(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(3, name="head")(nn.Embed(10, 4, name="emb")(ids))

    model, ids = WithEmbed(), jnp.array([[1, 2, 3]])
    params = model.init(jax.random.key(0), ids)["params"]
    lora = lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2, use_dora=True, targets=".*(embedding|kernel)"))
    with pytest.raises(ValueError, match=r"'emb/embedding' \(gather\): DoRA adapts linear layers and convolutions"):
        lj.wrap(model.apply)({"params": params, "lora": lora}, ids)
    with pytest.raises(ValueError, match="a DoRA merge cannot be undone"):
        lj.unmerge(lj.apply_lora(params, lora), lora)
    with pytest.raises(TypeError, match="no LoRA form for a bank"):
        lj.bank([lora])
    with pytest.raises(ValueError, match="no LoRA form to combine"):
        lj.combine([lora, lora], [1.0, 1.0], "cat")
    head_only = {"head": lora["head"]}
    plain = lj.init(jax.random.key(2), params, lj.LoraConfig(rank=2, targets="emb/embedding"))
    with pytest.raises(ValueError, match=r"mix the kinds \[.dora., .lora.\], which PEFT.s config tells apart by \[.use_dora.\]"):
        lj.to_peft(tmp_path / "mixed", {**plain, **head_only})
    with pytest.raises(ValueError, match="m has shape \\(2,\\), expected \\(3,\\)"):
        lj.DoraAdapter(jnp.zeros((4, 2)), jnp.zeros((2, 3)), m=jnp.ones(2), rank=2, alpha=1.0)
    lj.to_peft(tmp_path / "dora", head_only)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    key = "base_model.model.head.lora_magnitude_vector"
    tensors[key] = np.ones(5, np.float32)
    save_file(tensors, tmp_path / "dora" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"lora_magnitude_vector is float32\[5\], expected a float vector of shape \(3,\)"):
        lj.from_peft(tmp_path / "dora", params)


@pytest.mark.slow
def test_scanned_layers_and_nnx():
    from flax import nnx

    model, x = Scanned(), jax.random.normal(jax.random.key(0), (4, 8))
    params = model.init(jax.random.key(1), x)["params"]
    trained = _trained(params, roles=lj.axis_roles(model, x))
    assert trained["blocks"]["mix"]["kernel"].m.shape == (3, 8)
    got = lj.wrap(model.apply, compute="factored")({"params": params, "lora": trained}, x)
    np.testing.assert_allclose(got, model.apply({"params": lj.apply_lora(params, trained)}, x), rtol=1e-5, atol=1e-5)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.relu(self.fc1(x)))

    net = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(net)
    lora = _trained(state)
    want = nnx.merge(graphdef, lj.apply_lora(state, lora))(x)
    np.testing.assert_allclose(lj.wrap(graphdef, compute="factored")(state, lora, x), want, rtol=1e-5, atol=1e-5)
    lj.attach(net, lora, compute="factored")
    np.testing.assert_allclose(net(x), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_base_keeps_the_rescaling_in_float32():
    model = MLP(out=6)
    x = jax.random.normal(jax.random.key(1), (5, 8))
    params = model.init(jax.random.key(0), x)["params"]
    trained = _trained(params)
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    want = model.apply({"params": lj.apply_lora(params, trained)}, x)  # float32 throughout
    got = lj.wrap(model.apply, compute="factored")({"params": bf16, "lora": trained}, x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=2e-2 * np.abs(want).max())


@pytest.mark.slow
def test_a_zero_column_is_the_limit_not_nan():
    """A column of V = W + s·a⋅b that is exactly zero (a pruned or zero-initialised output): its
    output is the bias, it passes no gradient, and every other column is as if it were absent."""
    x = jax.random.normal(jax.random.key(0), (6, 8))
    kernel = jax.random.normal(jax.random.key(1), (8, 5)).at[:, 2].set(0.0)
    params = {"kernel": kernel, "bias": jnp.arange(5.0)}
    model = nn.Dense(5)
    fresh = lj.init(jax.random.key(2), params, lj.LoraConfig(rank=2, use_dora=True, targets="kernel"))
    apply = lj.wrap(model.apply, compute="factored")
    base = model.apply({"params": params}, x)
    np.testing.assert_array_equal(apply({"params": params, "lora": fresh}, x), base)  # a no-op, not NaN
    merged_fresh = lj.apply_lora(params, fresh)["kernel"]
    np.testing.assert_array_equal(merged_fresh[:, 2], 0.0)  # 0, not 0/0
    np.testing.assert_allclose(merged_fresh, kernel, rtol=1e-6)

    # Trained: b's column 2 still zero, so V's column 2 stays zero; compare with the model without it.
    trained = randomize(fresh, jax.random.key(3), 0.3)
    ad = trained["kernel"]
    ad = lj.DoraAdapter(ad.a, ad.b.at[:, 2].set(0.0), m=ad.m, rank=2, alpha=ad.alpha)
    keep = jnp.array([0, 1, 3, 4])
    rest_params = {"kernel": kernel[:, keep], "bias": params["bias"][keep]}
    rest = lj.DoraAdapter(ad.a, ad.b[:, keep], m=ad.m[keep], rank=2, alpha=ad.alpha)

    def loss(ad, params, n):
        return jnp.sum(jnp.sin(lj.wrap(nn.Dense(n).apply, compute="factored")({"params": params, "lora": {"kernel": ad}}, x)))

    y = apply({"params": params, "lora": {"kernel": ad}}, x)
    np.testing.assert_array_equal(y[:, 2], jnp.full((6,), params["bias"][2]))
    want = lj.wrap(nn.Dense(4).apply, compute="factored")({"params": rest_params, "lora": {"kernel": rest}}, x)
    np.testing.assert_allclose(y[:, keep], want, rtol=1e-6)
    g = jax.grad(loss)(ad, params, 5)
    g_rest = jax.grad(loss)(rest, rest_params, 4)
    assert all(bool(jnp.isfinite(t).all()) for t in jax.tree.leaves(g))
    assert float(g.m[2]) == 0.0 and not jnp.any(g.b[:, 2])
    np.testing.assert_allclose(g.a, g_rest.a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g.b[:, keep], g_rest.b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g.m[keep], g_rest.m, rtol=1e-5, atol=1e-7)
    merged = lj.apply_lora(params, {"kernel": ad})["kernel"]
    np.testing.assert_array_equal(merged[:, 2], 0.0)
    np.testing.assert_allclose(merged[:, keep], lj.apply_lora(rest_params, {"kernel": rest})["kernel"], rtol=1e-6)


def test_a_magnitude_beyond_the_adapter_dtype_is_refused():
    params = {"kernel": jnp.full((4, 3), 40000.0)}  # column norms 80000 > float16's 65504
    with pytest.raises(ValueError, match=r"'kernel': a column norm of the kernel overflows the adapter dtype float16"):
        lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, use_dora=True, targets="kernel", dtype=jnp.float16))
    assert lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, use_dora=True, targets="kernel"))["kernel"].m.dtype == jnp.float32
