"""PiSSA and OLoRA initialisations and their conversion to plain LoRA, against PEFT's on a PyTorch
twin (the same kernels), NumPy's SVD/QR for N-D and stacked kernels, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MLP

import lora_jax as lj

pytestmark = pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")


def _aligned(ours, theirs, axis):
    """``ours`` with each rank component's sign flipped to agree with ``theirs`` (SVD/QR signs are free)."""
    dots = np.sum(np.asarray(ours) * np.asarray(theirs), axis=axis, keepdims=True)
    return np.asarray(ours) * np.where(dots < 0, -1.0, 1.0)


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_equal_peft(twins, init):
    model, params, x, twin, torch, peft = twins
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["fc1", "fc2"], init_lora_weights=init)
    net = peft.get_peft_model(twin(), config)
    lora, residual = lj.init_residual(jax.random.key(0), params, lj.LoraConfig(rank=3, alpha=5.0, init=init))
    for name in ("fc1", "fc2"):
        layer, ad = getattr(net.base_model.model, name), lora[name]["kernel"]
        torch_a = layer.lora_A["default"].weight.detach().numpy().T
        torch_b = layer.lora_B["default"].weight.detach().numpy().T
        np.testing.assert_allclose(_aligned(ad.a, torch_a, 0), torch_a, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_aligned(ad.b, torch_b, 1), torch_b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(residual[name]["kernel"], layer.base_layer.weight.detach().numpy().T, rtol=1e-4,
                                   atol=1e-5)  # fmt: skip
    # The adapted model starts out as the original one, in both frameworks.
    xt = torch.tensor(np.asarray(x))
    np.testing.assert_allclose(net(xt).detach().numpy(), model.apply({"params": params}, x), rtol=1e-4, atol=1e-5)
    got = lj.wrap(model.apply)({"params": residual, "lora": lora}, x)
    np.testing.assert_allclose(got, model.apply({"params": params}, x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_randomized_pissa_finds_the_top_singular_directions():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    v, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    spectrum = 2.0 ** -np.arange(30)
    kernel = (u[:, :30] * spectrum) @ v.T  # (in 40, out 30), a fast-decaying spectrum
    params = {"dense": {"kernel": jnp.asarray(kernel, jnp.float32)}}
    exact, _ = lj.init_residual(jax.random.key(0), params, lj.LoraConfig(rank=4, alpha=4.0, init="pissa"))
    fast, residual = lj.init_residual(jax.random.key(0), params, lj.LoraConfig(rank=4, alpha=4.0, init="pissa_niter_4"))
    top = (u[:, :4] * spectrum[:4]) @ v[:, :4].T  # the top-4 part, from NumPy's factors
    # q = r with 4 subspace iterations: an error of about (σ5/σ4)^9 · σ5 ≈ 1e-4 for the randomized SVD.
    for tree, atol in ((exact, 1e-5), (fast, 3e-4)):
        ad = tree["dense"]["kernel"]
        np.testing.assert_allclose(ad.scale * np.asarray(ad.a) @ np.asarray(ad.b), top, atol=atol)
    np.testing.assert_allclose(residual["dense"]["kernel"], kernel - top, atol=3e-4)


@pytest.mark.slow
def test_stacked_and_nd_kernels_per_slice():
    """OLoRA/PiSSA of a (stack, in, out1, out2) kernel: each stack slice's (in, out1·out2) matrix."""
    kernel = jax.random.normal(jax.random.key(0), (2, 6, 2, 4))
    params = {"layers": {"kernel": kernel}}
    roles = {"layers/kernel": ("stack", "in", "out", "out")}
    for init in ("pissa", "olora"):
        lora, residual = lj.init_residual(jax.random.key(1), params, lj.LoraConfig(rank=2, init=init), roles=roles)
        ad = lora["layers"]["kernel"]
        assert ad.a.shape == (2, 6, 2) and ad.b.shape == (2, 2, 2, 4)
        for s in range(2):
            w = np.asarray(kernel[s]).reshape(6, 8)
            if init == "pissa":
                uu, ss, vt = np.linalg.svd(w, full_matrices=False)
                want = (uu[:, :2] * ss[:2]) @ vt[:2]
            else:
                q, r = np.linalg.qr(w.T)  # PEFT's weight is (out, in) = wᵀ
                want = ad.scale * (q[:, :2] @ r[:2]).T  # OLoRA's factors are not divided by the scale
            got = ad.scale * np.asarray(ad.a[s]) @ np.asarray(ad.b[s]).reshape(2, 8)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(lj.apply_lora(residual, lora)["layers"]["kernel"], kernel, atol=1e-5)


@pytest.mark.interop
def test_conversion_to_plain_lora_equals_peft(twins, tmp_path):
    model, params, x, twin, torch, peft = twins
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["fc1", "fc2"], init_lora_weights="pissa")
    net = peft.get_peft_model(twin(), config)
    net.save_pretrained(tmp_path / "initial")
    with torch.no_grad():  # "training"
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn_like(p))
    net.save_pretrained(tmp_path / "trained")
    net.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    _, residual = lj.init_residual(jax.random.key(0), params, lj.LoraConfig(rank=3, alpha=5.0, init="pissa"))
    initial = lj.from_peft(tmp_path / "initial", residual)
    trained = lj.from_peft(tmp_path / "trained", residual)
    ours = lj.convert_to_lora(trained, initial)
    theirs = lj.from_peft(tmp_path / "converted", params)
    for name in ("fc1", "fc2"):
        got, want = ours[name]["kernel"], theirs[name]["kernel"]
        assert (got.rank, got.alpha) == (want.rank, want.alpha) == (6, 10.0)
        np.testing.assert_array_equal(got.a, want.a)
        np.testing.assert_array_equal(got.b, want.b)
    want = net(torch.tensor(np.asarray(x))).detach().numpy()  # the trained PiSSA model (on its residual)
    got = lj.wrap(model.apply)({"params": params, "lora": ours}, x)  # the converted adapter on the original base
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_bad_input():
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    with pytest.raises(ValueError, match="init='pissa' moves part of each kernel.*lj.init_residual"):
        lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, init="pissa"))
    with pytest.raises(ValueError, match="'pissa_niter_K' \\(K >= 1\\), found 'pissa_niter_0'"):
        lj.LoraConfig(init="pissa_niter_0")
    with pytest.raises(ValueError, match="'dense/kernel': rank 4 > min\\(in=4, out=3\\)"):
        lj.init_residual(jax.random.key(0), params, lj.LoraConfig(rank=4, init="pissa"))
    one, _ = lj.init_residual(jax.random.key(0), params, lj.LoraConfig(rank=2, init="olora"))
    two, _ = lj.init_residual(jax.random.key(0), params, lj.LoraConfig(rank=1, init="olora"))
    with pytest.raises(ValueError, match="'dense/kernel': the trained adapter"):
        lj.convert_to_lora(one, two)
    with pytest.raises(ValueError, match="adapt different kernels"):
        lj.convert_to_lora(one, {})
    big = {"dense": {"kernel": jnp.ones((64, 8))}}
    with pytest.raises(ValueError, match=r"needs float kernels, and \['dense/kernel'\] are quantized"):
        lj.init_residual(jax.random.key(0), lj.quantize(big), lj.LoraConfig(rank=2, init="pissa"))


@pytest.mark.slow
def test_dora_with_pissa_converts_to_dora_of_the_original_base():
    model = MLP(out=6)
    x = jax.random.normal(jax.random.key(0), (5, 8))
    params = model.init(jax.random.key(1), x)["params"]
    initial, residual = lj.init_residual(jax.random.key(2), params, lj.LoraConfig(rank=3, init="pissa", use_dora=True))
    apply = lj.wrap(model.apply)
    np.testing.assert_allclose(apply({"params": residual, "lora": initial}, x), model.apply({"params": params}, x),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    trained = jax.tree.map(lambda t: t * 1.1 + 0.01, initial)
    converted = lj.convert_to_lora(trained, initial)
    assert isinstance(converted["fc1"]["kernel"], lj.DoraAdapter) and converted["fc1"]["kernel"].rank == 6
    np.testing.assert_allclose(apply({"params": params, "lora": converted}, x),
                               apply({"params": residual, "lora": trained}, x), rtol=1e-4, atol=1e-5)  # fmt: skip


def test_non_finite_kernels_are_refused_before_they_spread():
    params = {"a": {"kernel": jnp.ones((8, 4)).at[1, 2].set(jnp.nan)}, "b": {"kernel": jnp.ones((8, 4))},
              "c": {"kernel": jnp.ones((8, 4)).at[0, 0].set(jnp.inf)}}  # fmt: skip
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match=r"hold inf or NaN, which would spread .*\['a/kernel', 'c/kernel'\]"):
            lj.init_residual(jax.random.key(0), params, lj.LoraConfig(rank=2, init=init))
