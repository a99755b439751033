"""Interop with Hugging Face PEFT, checked against PEFT itself (skipped where torch/peft are absent)."""

import json
import os
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import leaf_pairs, randomize

import lora_jax as lj
from lora_jax._core import paths as _paths

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

V, D, H = 12, 8, 16
MODULES = ["embed", "q_proj", "fc", "out", "conv"]


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.q_proj = torch.nn.Linear(D, D)
        self.fc = torch.nn.Linear(D, H)
        self.out = torch.nn.Linear(H, D)
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, ids, img):
        h = self.embed(ids)
        h = h + torch.tanh(self.q_proj(h))
        return self.out(torch.relu(self.fc(h))), self.conv(img)


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, ids, img):
        h = nn.Embed(V, D, name="embed")(ids)
        h = h + jnp.tanh(nn.DenseGeneral((2, D // 2), name="q_proj")(h).reshape(h.shape))  # heads, flattened by PEFT
        return nn.Dense(D, name="out")(nn.relu(nn.Dense(H, name="fc")(h))), nn.Conv(5, (3, 3), padding=1, name="conv")(
            img
        )


IDS = np.array([[1, 2, 3, 11], [0, 5, 7, 9]])
IMG = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)  # NHWC


def _twins(seed=0):
    torch.manual_seed(seed)
    net = TorchNet().eval()
    w = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    params = {
        "embed": {"embedding": w["embed.weight"]},
        "q_proj": {"kernel": w["q_proj.weight"].T.reshape(D, 2, D // 2), "bias": w["q_proj.bias"].reshape(2, D // 2)},
        "fc": {"kernel": w["fc.weight"].T, "bias": w["fc.bias"]},
        "out": {"kernel": w["out.weight"].T, "bias": w["out.bias"]},
        "conv": {"kernel": w["conv.weight"].transpose(2, 3, 1, 0), "bias": w["conv.bias"]},
    }
    return net, jax.tree.map(jnp.asarray, params)


def _torch_out(model):
    with torch.no_grad():
        h, c = model(torch.as_tensor(IDS), torch.as_tensor(IMG.transpose(0, 3, 1, 2)))
    return h.numpy(), c.numpy().transpose(0, 2, 3, 1)


def _flax_out(params, lora):
    return lj.wrap(FlaxNet().apply, compute="factored")({"params": params, "lora": lora}, IDS, IMG)


@pytest.mark.interop
def test_twins_agree_without_adapters():
    net, params = _twins()
    for u, v in zip(_torch_out(net), FlaxNet().apply({"params": params}, IDS, IMG)):
        np.testing.assert_allclose(u, v, atol=1e-5)


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_jax_adapter_loads_in_peft_with_the_same_outputs(tmp_path, rslora):
    net, params = _twins()
    cfg = lj.LoraConfig(
        rank=4,
        alpha=8,
        targets=r"(embed/embedding|.*/kernel)",
        use_rslora=rslora,
        rank_pattern={"fc/kernel": 2},
        alpha_pattern={"out/kernel": 3.0},
    )
    lora = randomize(
        lj.init(jax.random.key(1), params, cfg, roles=lj.axis_roles(FlaxNet(), IDS, IMG)), jax.random.key(2), 0.3
    )
    lj.to_peft(tmp_path, lora)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(MODULES) and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {"^fc": 2} and config["alpha_pattern"] == {"^out": 3.0}
    model = peft.PeftModel.from_pretrained(net, str(tmp_path))
    expected = _flax_out(params, lora)
    assert not np.allclose(expected[0], FlaxNet().apply({"params": params}, IDS, IMG)[0], atol=1e-3)
    for u, v in zip(_torch_out(model), expected):
        np.testing.assert_allclose(u, v, atol=1e-4)


@pytest.mark.interop
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_lora_jax_with_the_same_outputs(tmp_path, rslora):
    net, params = _twins()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=MODULES,
        use_rslora=rslora,
        init_lora_weights=False,
        rank_pattern={"fc": 2},
        alpha_pattern={"out": 3},
    )
    model = peft.get_peft_model(net, config).eval()
    model.save_pretrained(str(tmp_path))
    lora = lj.from_peft(tmp_path, params)
    assert lora["fc"]["kernel"].rank == 2 and lora["out"]["kernel"].alpha == 3.0
    assert lora["q_proj"]["kernel"].roles == ("in", "out", "out") and lora["conv"]["kernel"].a.shape == (3, 3, 3, 4)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lora))
    flax_out = _flax_out(params, lora)
    for u, v in zip(_torch_out(model), flax_out):
        np.testing.assert_allclose(u, v, atol=1e-4)
    merged = FlaxNet().apply({"params": lj.apply_lora(params, lora)}, IDS, IMG)
    for u, v in zip(_torch_out(model.merge_and_unload()), merged):
        np.testing.assert_allclose(u, v, atol=1e-4)


@pytest.mark.slow
@pytest.mark.interop
def test_round_trip_is_bit_exact(tmp_path):
    _, params = _twins()
    cfg = lj.LoraConfig(rank=3, alpha=5, targets=r"(embed/embedding|.*/kernel)", rank_pattern={"conv/kernel": 2})
    lora = randomize(
        lj.init(jax.random.key(1), params, cfg, roles=lj.axis_roles(FlaxNet(), IDS, IMG)), jax.random.key(2)
    )
    lj.to_peft(tmp_path, lora)
    back = lj.from_peft(tmp_path, params)
    assert jax.tree.structure(back) == jax.tree.structure(lora)
    for u, v in leaf_pairs(back, lora):
        np.testing.assert_array_equal(u, v)


def test_stacked_kernels_need_and_use_a_layer_placeholder(tmp_path):
    params = {"layers": {"dense": {"kernel": jnp.ones((3, 6, 5))}}}
    roles = {"layers/dense/kernel": ("stack", "in", "out")}
    lora = randomize(lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2), roles=roles), jax.random.key(1))
    with pytest.raises(ValueError, match=r"stacked over 1 axes; name_map must return a name with one '\{\}'"):
        lj.to_peft(tmp_path, lora)
    name_map = lambda path: "model.layers.{}.dense" if path == "layers/dense/kernel" else path
    lj.to_peft(tmp_path, lora, name_map=name_map)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.dense", "model.layers.1.dense", "model.layers.2.dense"]
    back = lj.from_peft(tmp_path, params, name_map=name_map)
    np.testing.assert_array_equal(back["layers"]["dense"]["kernel"].a, lora["layers"]["dense"]["kernel"].a)
    assert back["layers"]["dense"]["kernel"].roles == ("stack", "in", "out")


# ---- bad input ------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path):
    _, params = _twins()
    lora = lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2, targets=r"(fc|out)/kernel"))
    lj.to_peft(tmp_path, lora)
    return tmp_path, params


def test_missing_files(exported):
    directory, params = exported
    os.remove(directory / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors in"):
        lj.from_peft(directory, params)
    os.remove(directory / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json in"):
        lj.from_peft(directory, params)


def test_modules_the_model_lacks_are_named_with_nearest(exported):
    directory, params = exported
    other = {"fc": params["fc"], "output": params["out"]}
    with pytest.raises(ValueError, match=r"module 'out' matches no kernel of params \(nearest: \['output'\]\)"):
        lj.from_peft(directory, other)


def test_shape_mismatch(exported):
    directory, params = exported
    params = dict(params, fc={"kernel": jnp.ones((D + 1, H))})
    with pytest.raises(
        ValueError, match=r"module 'fc' -> 'fc/kernel': A \(2, 8\) and B \(16, 2\) do not fit the kernel \(9, 16\)"
    ):
        lj.from_peft(directory, params)


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for key, value in changes.items():
        if value is ...:
            del config[key]
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(peft_type="IA3"), ValueError, r"peft_type 'IA3'; only 'LORA' is supported"),
        (dict(r=...), ValueError, r"lacks the required keys \['r'\]"),
        (dict(lora_bias=True), ValueError, r"uses PEFT features lora_jax does not import: \{'lora_bias': True\}"),
        (dict(use_dora=True), ValueError, r"'fc/kernel': the config says use_dora: true but the module has no lora_mag"),
        (dict(r=3), ValueError, r"do not have the config's rank 3"),
    ],
)
def test_bad_config(exported, changes, error, match):
    directory, params = exported
    _edit_config(directory, **changes)
    with pytest.raises(error, match=match):
        lj.from_peft(directory, params)


def test_unknown_config_keys_warn(exported):
    directory, params = exported
    _edit_config(directory, shiny_new_option=1)
    with pytest.warns(UserWarning, match=r"ignoring unknown adapter_config\.json keys \['shiny_new_option'\]"):
        lj.from_peft(directory, params)


def test_tampered_safetensors_header(exported):
    directory, params = exported
    path = directory / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"{garbage!!!!"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"is not a readable safetensors file"):
        lj.from_peft(directory, params)


def test_non_lora_tensors_rejected(exported):
    directory, params = exported
    import safetensors.numpy

    path = directory / "adapter_model.safetensors"
    tensors = safetensors.numpy.load(path.read_bytes())
    tensors["base_model.model.classifier.modules_to_save.default.weight"] = np.ones((2, 2), np.float32)
    path.write_bytes(safetensors.numpy.save(tensors))
    with pytest.raises(ValueError, match=r"holds keys that are not LoRA A/B weights"):
        lj.from_peft(directory, params)


def test_mixed_rslora_cannot_export(tmp_path):
    ad = lambda rslora: lj.Adapter(jnp.ones((4, 1)), jnp.ones((1, 4)), rank=1, alpha=1.0, rslora=rslora)
    with pytest.raises(ValueError, match=r"mix rsLoRA and plain LoRA scaling"):
        lj.to_peft(tmp_path, {"a": {"kernel": ad(True)}, "b": {"kernel": ad(False)}})
    assert not os.listdir(tmp_path)  # nothing half-written


@pytest.mark.slow
@pytest.mark.interop
def test_merged_export_with_torch_names_loads_into_pytorch(tmp_path):
    from safetensors.torch import load_file

    net, params = _twins()
    roles = lj.axis_roles(FlaxNet(), IDS, IMG)
    cfg = lj.LoraConfig(rank=3, alpha=6, targets=r"(embed/embedding|.*/kernel)")
    lora = randomize(lj.init(jax.random.key(1), params, cfg, roles=roles), jax.random.key(2), 0.3)
    lj.save_params(tmp_path / "merged.safetensors", params, lora, torch_names=True, roles=roles)
    state = load_file(str(tmp_path / "merged.safetensors"))
    assert sorted(state) == sorted(net.state_dict())
    net.load_state_dict(state)
    for u, v in zip(_torch_out(net), FlaxNet().apply({"params": lj.apply_lora(params, lora)}, IDS, IMG)):
        np.testing.assert_allclose(u, v, atol=1e-5)


@pytest.mark.interop
def test_torch_names_need_roles_for_nd_kernels(tmp_path):
    _, params = _twins()
    with pytest.raises(
        ValueError,
        match=r"no PyTorch layout for:\n  'conv/kernel': the kernel \(3, 3, 3, 5\) has more than 2 axes and no roles",
    ):
        lj.save_params(tmp_path / "m.safetensors", params, torch_names=True)
    assert not os.listdir(tmp_path)


# ---- modules_to_save: a classification head trained fully ------------------------------------


class TorchClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(D, H)
        self.classifier = torch.nn.Linear(H, 3)

    def forward(self, x):
        return self.classifier(torch.tanh(self.body(x)))


class FlaxClassifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="classifier")(jnp.tanh(nn.Dense(H, name="body")(x)))


X_CLS = np.random.default_rng(1).normal(size=(4, D)).astype(np.float32)


def _classifier_twins(seed=0):
    torch.manual_seed(seed)
    net = TorchClassifier().eval()
    w = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    params = {m: {"kernel": jnp.asarray(w[f"{m}.weight"].T), "bias": jnp.asarray(w[f"{m}.bias"])} for m in ("body", "classifier")}
    return net, params


@pytest.mark.interop
def test_modules_to_save_exported_to_peft(tmp_path):
    net, params = _classifier_twins()
    cfg = lj.LoraConfig(rank=2, alpha=4, targets="body/kernel", trainable="classifier/.*")
    lora = randomize(lj.init(jax.random.key(0), params, cfg), jax.random.key(1))
    assert isinstance(lora["classifier"]["kernel"], lj.FullWeight)
    lj.to_peft(tmp_path, lora)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["target_modules"] == ["body"]
    model = peft.PeftModel.from_pretrained(net, tmp_path).eval()
    with torch.no_grad():
        want = model(torch.as_tensor(X_CLS)).numpy()
    got = lj.wrap(FlaxClassifier().apply, compute="factored")({"params": params, "lora": lora}, X_CLS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.interop
def test_modules_to_save_imported_from_peft(tmp_path):
    net, params = _classifier_twins()
    torch.manual_seed(3)
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["body"], modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    lora = lj.from_peft(tmp_path, params)
    assert isinstance(lora["classifier"]["kernel"], lj.FullWeight) and isinstance(lora["classifier"]["bias"], lj.FullWeight)
    model.eval()
    with torch.no_grad():
        want = model(torch.as_tensor(X_CLS)).numpy()
        merged = {k: v.numpy() for k, v in model.merge_and_unload().state_dict().items()}
    got = lj.wrap(FlaxClassifier().apply, compute="factored")({"params": params, "lora": lora}, X_CLS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ours = lj.apply_lora(params, lora)
    np.testing.assert_allclose(ours["classifier"]["kernel"], merged["classifier.weight"].T, rtol=1e-6)
    np.testing.assert_allclose(ours["body"]["kernel"], merged["body.weight"].T, rtol=1e-5, atol=1e-6)


@pytest.mark.interop
def test_to_peft_never_leaves_a_mixed_pair(tmp_path, monkeypatch):
    """An exception midway leaves the previous pair; a crash between the two renames is detected."""
    net, params = _classifier_twins()
    cfg = lj.LoraConfig(rank=2, alpha=4, targets="body/kernel")
    old = randomize(lj.init(jax.random.key(0), params, cfg), jax.random.key(1))
    lj.to_peft(tmp_path, old)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, alpha=8, targets="body/kernel"))
    with pytest.raises(ValueError, match=r"lora_jax\.to_peft: the adapter config cannot be written as JSON"):
        lj.to_peft(tmp_path, new, base_model_name_or_path=object())  # fails before anything is replaced
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no temporary file is left
    # A crash after the weights were replaced and before the config was: new weights, old config.
    from lora_jax._files import safetensors as _safetensors

    real = _safetensors.atomic_write
    monkeypatch.setattr(_safetensors, "atomic_write", lambda path, write, where: (real(path, write, where), 1 / 0)[0])
    with pytest.raises(ZeroDivisionError):
        lj.to_peft(tmp_path, new)
    monkeypatch.undo()
    assert (tmp_path / "adapter_config.json").read_bytes() == before["adapter_config.json"]
    with pytest.raises(ValueError, match=r"was written together with another adapter_config\.json.*'lora_alpha': \(8\.0, 4\.0\)"):
        lj.from_peft(tmp_path, params)


# ---- rank_pattern / alpha_pattern keys resolve, under PEFT's own matching, to their module only ----

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_jax._files import peft as _peft  # noqa: E402

_NAME = st.lists(st.text("abpq_()[]+*?.0", min_size=1, max_size=4).filter(lambda s: s.strip(".") == s and ".." not in s), min_size=1, max_size=3).map(".".join)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.lists(_NAME, min_size=2, max_size=6, unique=True))
def test_pattern_keys_match_their_module_only_under_peft(names):
    from peft.utils.other import get_pattern_key

    keys = {_peft.pattern_key(n): n for n in names}
    for name in names:
        # PEFT returns the first key that matches, or the name itself when none does.
        matching = [k for k in keys if get_pattern_key([k], name) == k]
        assert matching == [_peft.pattern_key(name)], (name, matching)


@pytest.mark.interop
def test_overlapping_module_names_keep_their_own_ranks_in_peft(tmp_path):
    """'proj' must not hit 'enc.proj'; 'a.b' must not hit 'a_b' (PEFT's regex matching)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, D)
            self.enc = torch.nn.Module()
            self.enc.proj = torch.nn.Linear(D, D)
            self.a_b = torch.nn.Linear(D, D)
            self.a = torch.nn.Module()
            self.a.b = torch.nn.Linear(D, D)

    torch.manual_seed(0)
    net = Net()
    params = {
        "proj": {"kernel": jnp.ones((D, D))},
        "enc": {"proj": {"kernel": jnp.ones((D, D))}},
        "a_b": {"kernel": jnp.ones((D, D))},
        "a": {"b": {"kernel": jnp.ones((D, D))}},
    }
    cfg = lj.LoraConfig(rank=2, alpha=2, rank_pattern={"proj/kernel": 4, "a/b/kernel": 3}, alpha_pattern={"a_b/kernel": 5.0})
    lora = randomize(lj.init(jax.random.key(0), params, cfg), jax.random.key(1))
    lj.to_peft(tmp_path, lora)
    model = peft.PeftModel.from_pretrained(net, tmp_path)
    ranks = {n: m.r["default"] for n, m in model.named_modules() if hasattr(m, "r") and isinstance(m.r, dict)}
    alphas = {n: m.lora_alpha["default"] for n, m in model.named_modules() if hasattr(m, "lora_alpha")}
    prefix = "base_model.model."
    assert {k[len(prefix) :]: v for k, v in ranks.items()} == {"proj": 4, "enc.proj": 2, "a_b": 2, "a.b": 3}
    assert {k[len(prefix) :]: v for k, v in alphas.items()} == {"proj": 2, "enc.proj": 2, "a_b": 5, "a.b": 2}
    back = lj.from_peft(tmp_path, params)
    assert (back["proj"]["kernel"].rank, back["enc"]["proj"]["kernel"].rank, back["a"]["b"]["kernel"].rank) == (4, 2, 3)
    assert back["a_b"]["kernel"].alpha == 5.0 and back["a"]["b"]["kernel"].alpha == 2.0


# ---- NNX models: State paths with integer layer keys ------------------------------------------

from flax import nnx  # noqa: E402


class TorchStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(D, D) for _ in range(2)])
        self.out = torch.nn.Linear(D, H)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.out(h)


class NNXStack(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(D, D, rngs=rngs) for _ in range(2)])
        self.out = nnx.Linear(D, H, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = jnp.tanh(layer(h))
        return self.out(h)


def _nnx_twins(seed=0):
    torch.manual_seed(seed)
    net = TorchStack().eval()
    w = {k: jnp.asarray(v.detach().numpy()) for k, v in net.state_dict().items()}
    model = NNXStack(nnx.Rngs(0))
    model.embed.embedding[...] = w["embed.weight"]
    for i, layer in enumerate(model.layers):
        layer.kernel[...], layer.bias[...] = w[f"layers.{i}.weight"].T, w[f"layers.{i}.bias"]
    model.out.kernel[...], model.out.bias[...] = w["out.weight"].T, w["out.bias"]
    return net, model


@pytest.mark.interop
def test_nnx_adapters_both_ways_with_peft(tmp_path):
    net, model = _nnx_twins()
    graphdef, state = nnx.split(model)
    with torch.no_grad():
        np.testing.assert_allclose(model(IDS), net(torch.as_tensor(IDS)).numpy(), atol=1e-5)
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=r"(embed/embedding|.*/kernel)", rank_pattern={"layers/1/kernel": 3})
    lora = randomize(lj.init(jax.random.key(0), state, cfg), jax.random.key(1), 0.3)
    lj.to_peft(tmp_path / "out", lora)
    peft_model = peft.PeftModel.from_pretrained(net, tmp_path / "out").eval()
    with torch.no_grad():
        want = peft_model(torch.as_tensor(IDS)).numpy()
    np.testing.assert_allclose(lj.wrap(model, compute="factored")(state, lora, IDS), want, rtol=1e-5, atol=1e-5)
    # PEFT-trained adapters into the NNX model, merged export included.
    net2, model2 = _nnx_twins(seed=1)
    torch.manual_seed(2)
    trained = peft.get_peft_model(net2, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["layers.0", "layers.1", "out"]))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    trained.save_pretrained(tmp_path / "in")
    graphdef2, state2 = nnx.split(model2)
    imported = lj.from_peft(tmp_path / "in", state2)
    assert sorted(imported["layers"]) == [0, 1]  # integer keys, as in the State
    with torch.no_grad():
        want = trained.eval()(torch.as_tensor(IDS)).numpy()
    np.testing.assert_allclose(lj.wrap(model2, compute="factored")(state2, imported, IDS), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nnx.merge(graphdef2, lj.apply_lora(state2, imported))(IDS), want, rtol=1e-5, atol=1e-5)
    lj.save_params(tmp_path / "merged.safetensors", state2, imported, torch_names=True)
    merged = safetensors.numpy.load_file(tmp_path / "merged.safetensors")
    reference = {k: v.numpy() for k, v in trained.merge_and_unload().state_dict().items()}
    assert merged.keys() == reference.keys()
    for k in reference:
        np.testing.assert_allclose(merged[k], reference[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.interop
def test_hugging_face_flax_gpt2_trains_factored_and_exports_to_pytorch_gpt2(tmp_path):
    """transformers' own Flax GPT-2 (its Conv1D kernels are stored (out, in) and used as x @ W.T):
    no registration, no roles by hand; PEFT's GPT-2 (fan_in_fan_out) gives the same logits."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FlaxGPT2LMHeadModel") or int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("needs transformers 4.x (its Flax models)")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.FlaxGPT2LMHeadModel(cfg, seed=0)
    params, ids = model.params, jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    logits = lambda p, ids: model(ids, params=p).logits
    roles = lj.axis_roles(logits, params, ids)
    assert roles["transformer/h/0/attn/c_attn/kernel"] == ("out", "in")
    assert roles["transformer/wte/embedding"] == ("in", "out")
    cfg_lora = lj.LoraConfig(rank=2, targets=r".*/(c_attn|c_proj|c_fc)/kernel")
    lora = randomize(lj.init(jax.random.key(1), params, cfg_lora, roles=roles), jax.random.key(2), 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing merged
        got = lj.wrap(logits, compute="factored")(params, lora, ids)
    np.testing.assert_allclose(got, logits(lj.apply_lora(params, lora), ids), rtol=1e-5, atol=1e-6)

    torch_model = transformers.GPT2LMHeadModel(cfg).eval()
    state = {}
    for path, leaf in _paths.leaves_with_paths(params):  # Flax names -> PyTorch names (kernels transposed)
        *module, name = map(str, path)
        leaf = np.asarray(leaf).T if name == "kernel" else np.asarray(leaf)
        state[".".join(module + ["bias" if name == "bias" else "weight"])] = torch.tensor(leaf)
    torch_model.load_state_dict(state, strict=False)  # lm_head is tied to wte
    lj.to_peft(tmp_path, lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes that it sets fan_in_fan_out for Conv1D itself
        peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path)
    with torch.no_grad():
        want = peft_model(torch.tensor(np.asarray(ids))).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"fan_in_fan_out: true .* roles=lj\.axis_roles"):
        lj.from_peft(tmp_path, params)  # GPT-2's (out, in) kernels need their roles to be read back
    chex.assert_trees_all_close(lj.from_peft(tmp_path, params, roles=roles), lora, rtol=0, atol=0)
