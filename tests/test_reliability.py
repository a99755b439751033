"""Regression tests for hostile inputs across the public API: each gets a clear ValueError /
TypeError / OSError naming the function, and nothing is silently wrong or half-written."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from conftest import randomize

import lora_jax as lj
from lora_jax._files import safetensors as _safetensors

PARAMS = {"enc": {"q": {"kernel": jnp.ones((6, 5)), "bias": jnp.zeros(5)}}, "head": {"kernel": jnp.ones((5, 3))}}


def _lora(**kw):
    cfg = lj.LoraConfig(**{"rank": 2, "alpha": 4, "targets": ".*/kernel", **kw})
    return randomize(lj.init(jax.random.key(0), PARAMS, cfg), jax.random.key(1))


# ---- silent wrong results ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.bool_, jnp.complex64])
def test_merge_refuses_non_floating_kernels(dtype):
    params = {"w": {"kernel": jnp.ones((6, 5), dtype)}}
    ad = {"w": {"kernel": lj.Adapter(jnp.ones((6, 2)), jnp.ones((2, 5)), rank=2, alpha=2.0)}}
    for fn in (lj.apply_lora, lj.unmerge):
        with pytest.raises(ValueError, match=rf"'w/kernel': the parameter has dtype {jnp.dtype(dtype).name}; only floating"):
            fn(params, ad)


def test_keys_with_slashes_that_collide_are_refused(tmp_path):
    params = {"a/b": {"kernel": jnp.ones((4, 3))}, "a": {"b/kernel": jnp.zeros((4, 3))}}
    ad = {"a/b": {"kernel": lj.Adapter(jnp.ones((4, 1)), jnp.ones((1, 3)), rank=1, alpha=1.0)}}
    with pytest.raises(ValueError, match=r"lora_jax\.apply_lora: keys containing '/' make two leaves share a path"):
        lj.apply_lora(params, ad)
    with pytest.raises(ValueError, match=r"lora_jax\.save_params: keys containing '/'"):
        lj.save_params(tmp_path / "p.safetensors", params)
    with pytest.raises(ValueError, match=r"lora_jax\.init: keys containing '/'"):
        lj.init(jax.random.key(0), params, lj.LoraConfig(rank=1))
    assert not os.listdir(tmp_path)


def test_file_entries_that_nest_into_each_other_are_refused(tmp_path):
    file = tmp_path / "ad.safetensors"
    ad = lj.Adapter(np.ones((4, 1), np.float32), np.ones((1, 3), np.float32), rank=1, alpha=1.0)
    static = {"rank": 1, "alpha": 1.0, "roles": ["in", "out"], "rslora": False, "dropout": 0.0}
    entries = {p: {"keys": p.split("/"), "kind": "lora", "static": static, "arrays": ["a", "b"]} for p in ("d/kernel", "d")}
    tensors = [_safetensors.Tensor(f"{p}/{n}", x.shape, x.dtype, lambda x=x: x) for p in entries for n, x in (("a", ad.a), ("b", ad.b))]
    _safetensors.write(file, tensors, {"lora_jax": json.dumps({"version": 2, "adapters": entries})}, "test")
    with pytest.raises(ValueError, match=r"lora_jax\.load: .*'d' would replace another entry|nests inside"):
        lj.load(file)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(use_rslora="false"), r"use_rslora: 'false'; expected true or false"),
        (dict(lora_dropout=2.0), r"lora_dropout: 2\.0; expected a number in \[0, 1\)"),
        (dict(lora_dropout=-0.1), r"lora_dropout: -0\.1"),
        (dict(lora_alpha=0), r"lora_alpha: 0; expected a finite number > 0"),
        (dict(lora_alpha=-2), r"lora_alpha: -2"),
        (dict(lora_alpha="8"), r"lora_alpha: '8'"),
        (dict(lora_alpha=None), r"lora_alpha: None"),
        (dict(lora_alpha=[8]), r"lora_alpha: \[8\]"),
        (dict(r=0), r"r: 0; expected an int >= 1"),
        (dict(rank_pattern=["q"]), r"rank_pattern: \['q'\]; expected an object"),
        (dict(rank_pattern={"(": 2}), r"rank_pattern: \{'\(': 2\}"),
        (dict(alpha_pattern={"q": float("inf")}), r"alpha_pattern: \{'q': inf\}"),
        (dict(fan_in_fan_out="yes"), r"fan_in_fan_out: 'yes'"),
    ],
)
def test_bad_peft_config_values(tmp_path, change, match):
    lj.to_peft(tmp_path, _lora())
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=r"lora_jax\.from_peft: .* has invalid values:\n  " + match):
        lj.from_peft(tmp_path, PARAMS)


def test_alpha_whose_scale_overflows_float32():
    with pytest.raises(ValueError, match=r"lora_jax\.Adapter: alpha 1e\+308 with rank 2 gives the scale .* float32 cannot hold"):
        lj.Adapter(jnp.ones((6, 2)), jnp.ones((2, 5)), rank=2, alpha=1e308)


def test_fan_in_fan_out_is_cross_checked_against_roles(tmp_path):
    """A Conv1D (GPT-2) adapter: PEFT's fan_in_fan_out says the Flax kernel may be (out, in)."""
    params = {"c_attn": {"kernel": jnp.ones((6, 6))}}  # square: shapes cannot tell
    roles = {"c_attn/kernel": ("out", "in")}
    lora = randomize(lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2), roles=roles), jax.random.key(1))
    lj.to_peft(tmp_path, lora)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with pytest.raises(ValueError, match=r"fan_in_fan_out: true .* pass its roles.*\('out', 'in'\)"):
        lj.from_peft(tmp_path, params)
    back = lj.from_peft(tmp_path, params, roles=roles)
    np.testing.assert_array_equal(lj.apply_lora(params, back)["c_attn"]["kernel"], lj.apply_lora(params, lora)["c_attn"]["kernel"])
    # Ordinary square Dense kernels keep the default roles and fan_in_fan_out false.
    plain = randomize(lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2)), jax.random.key(1))
    lj.to_peft(tmp_path, plain)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    assert lj.from_peft(tmp_path, params)["c_attn"]["kernel"].roles == ("in", "out")


# ---- files that could not be read back ---------------------------------------------------------


def test_float8_refused_at_creation_and_on_save(tmp_path):
    with pytest.raises(TypeError, match=r"lora_jax\.LoraConfig: dtype must be a floating dtype that adapter files store"):
        lj.LoraConfig(dtype=jnp.float8_e4m3fn)
    ad = {"w": {"kernel": lj.Adapter(jnp.ones((4, 1), jnp.float8_e4m3fn), jnp.ones((1, 3), jnp.float8_e4m3fn), rank=1, alpha=1.0)}}
    with pytest.raises(ValueError, match=r"lora_jax\.save: 'w/kernel/a' has dtype float8_e4m3fn, which safetensors cannot store"):
        lj.save(tmp_path / "ad.safetensors", ad)
    with pytest.raises(ValueError, match=r"lora_jax\.save_params: .*float8_e4m3fn, which safetensors cannot store"):
        lj.save_params(tmp_path / "p.safetensors", {"w": jnp.ones(3, ml_dtypes.float8_e4m3fn)})
    assert not os.listdir(tmp_path)


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    file = tmp_path / "ad.safetensors"
    _safetensors.write(file, [], {"lora_jax": deep}, "test")
    with pytest.raises(ValueError, match=r"its lora_jax metadata is not valid \(RecursionError\)"):
        lj.load(file)
    lj.to_peft(tmp_path / "peft", _lora())
    (tmp_path / "peft" / "adapter_config.json").write_text(deep)
    with pytest.raises(ValueError, match=r"lora_jax\.from_peft: .* is not valid JSON \(RecursionError"):
        lj.from_peft(tmp_path / "peft", PARAMS)


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"base_model.model.enc.q.lora_A.weight": np.array(1.0, np.float32), "base_model.model.enc.q.lora_B.weight": np.ones((5, 2), np.float32)}, r"are not floating-point factors of equal rank >= 2"),
        ({"base_model.model.enc.q.lora_A.weight": np.ones((2, 6), np.float32), "base_model.model.enc.q.lora_B.weight": np.ones(5, np.float32)}, r"are not floating-point factors"),
        ({"base_model.model.enc.q.lora_A.weight": np.ones((2, 6), np.int32), "base_model.model.enc.q.lora_B.weight": np.ones((5, 2), np.int32)}, r"are not floating-point factors"),
    ],
)
def test_malformed_peft_tensors(tmp_path, tensors, match):
    lj.to_peft(tmp_path, {"enc": _lora()["enc"]})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    safetensors.numpy.save_file(tensors, tmp_path / "adapter_model.safetensors")  # as PEFT writes: no checksums
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"(?s)lora_jax\.from_peft: .*'enc\.q' -> 'enc/q/kernel': .*" + match):
        lj.from_peft(tmp_path, PARAMS)


# ---- raw exceptions turned into clear errors ---------------------------------------------------


def test_python_lists_as_arrays():
    ad = {"head": {"kernel": lj.Adapter([[1.0]] * 5, [[1.0] * 3], rank=1, alpha=1.0)}}
    with pytest.raises(TypeError, match=r"(?s)lora_jax\.apply_lora: adapter arrays must be floating-point arrays.*'head/kernel': a is a list"):
        lj.apply_lora(PARAMS, ad)


def test_roles_key_that_is_not_a_regex():
    params = {"w": {"kernel": jnp.ones((2, 3, 4))}}
    with pytest.raises(ValueError, match=r"lora_jax\.init: roles: the key '\(' is not a valid regex"):
        lj.init(jax.random.key(0), params, lj.LoraConfig(rank=1), roles={"(": ("in", "out", "out")})
    with pytest.raises(TypeError, match=r"lora_jax\.init: roles must be a dict"):
        lj.init(jax.random.key(0), params, lj.LoraConfig(rank=1), roles=[("in", "out", "out")])


def test_bad_keys_in_file_metadata(tmp_path):
    lj.save(tmp_path / "ad.safetensors", _lora())
    with _safetensors.reading(tmp_path / "ad.safetensors", "t", "f") as f:
        tensors, doc = {n: f.get(n) for n in f.names}, json.loads(f.metadata["lora_jax"])
    doc["adapters"]["head/kernel"]["keys"] = ["head", {"x": 1}]
    _safetensors.write(tmp_path / "ad.safetensors", [_safetensors.Tensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()], {"lora_jax": json.dumps(doc)}, "t")
    with pytest.raises(ValueError, match=r"'head/kernel': metadata keys \['head', \{'x': 1\}\] do not spell the path"):
        lj.load(tmp_path / "ad.safetensors")


def test_colliding_names_in_load_params(tmp_path):
    file = tmp_path / "p.safetensors"
    names = [["d", "kernel"], ["d"]]
    tensors = [_safetensors.Tensor("/".join(k), (2,), np.dtype("float32"), lambda: np.ones(2, np.float32)) for k in names]
    _safetensors.write(file, tensors, {"lora_jax_params": json.dumps([["/".join(k), k] for k in names])}, "t")
    with pytest.raises(ValueError, match=r"lora_jax\.load_params: .*'d'"):
        lj.load_params(file)


def test_paths(tmp_path, monkeypatch):
    lora = _lora()
    lj.save(os.fsencode(tmp_path / "bytes.safetensors"), lora)  # a bytes path works
    assert lj.load(os.fsencode(tmp_path / "bytes.safetensors"))["head"]["kernel"].rank == 2
    with pytest.raises(FileNotFoundError, match=rf"lora_jax\.save: cannot write '{tmp_path}/missing/ad\.safetensors': the directory '{tmp_path}/missing' does not exist"):
        lj.save(tmp_path / "missing" / "ad.safetensors", lora)
    with pytest.raises(ValueError, match=r"lora_jax\.save: the path is empty"):
        lj.save("", lora)
    with pytest.raises(TypeError, match=r"lora_jax\.save_params: expected a file path \(str or os\.PathLike\), found int"):
        lj.save_params(3, PARAMS)
    with pytest.raises(IsADirectoryError, match=rf"lora_jax\.save: '{tmp_path}' is a directory"):
        lj.save(tmp_path, lora)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"lora_jax\.to_peft: '.*file' exists and is not a directory"):
        lj.to_peft(tmp_path / "file", lora)
    if os.geteuid() != 0:  # root writes anywhere
        os.chmod(tmp_path, 0o500)
        try:
            with pytest.raises(PermissionError, match=r"lora_jax\.save: cannot write .* cannot be written to"):
                lj.save(tmp_path / "ro.safetensors", lora)
        finally:
            os.chmod(tmp_path, 0o700)


@pytest.mark.parametrize(
    "name_map, match",
    [
        (lambda p: None, r"name_map must return a non-empty str \(got None\)"),
        (lambda p: "a.{x}", r"name_map returned braces other than the '\{\}'"),
        (lambda p: "a.{}", r"name_map returned a '\{\}' \(a layer index\), which only belongs in the name of a stacked"),
    ],
)
def test_name_map_results_are_checked(tmp_path, name_map, match):
    with pytest.raises(ValueError, match=r"lora_jax\.to_peft: cannot export:\n  'enc/q/kernel': " + match):
        lj.to_peft(tmp_path / "peft", _lora(), name_map=name_map)
    assert not (tmp_path / "peft").exists()


def test_targets_callable_that_raises_or_returns_an_array():
    def boom(path, leaf):
        raise KeyError("nope")

    with pytest.raises(ValueError, match=r"lora_jax\.init: the targets callable raised on 'enc/q/bias': KeyError\('nope'\)"):
        lj.init(jax.random.key(0), PARAMS, lj.LoraConfig(targets=boom))
    with pytest.raises(TypeError, match=r"lora_jax\.init: the targets callable must return a bool, returned ArrayImpl on 'enc/q/bias'"):
        lj.init(jax.random.key(0), PARAMS, lj.LoraConfig(targets=lambda p, x: x > 0))


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(targets=5), TypeError, r"targets must be a regex string.*found an element 5"),
        (dict(dtype=None), TypeError, r"dtype must be a floating dtype.*found None"),
    ],
)
def test_config_values(kw, error, match):
    with pytest.raises(error, match=r"lora_jax\.LoraConfig: " + match):
        lj.LoraConfig(**kw)


def test_summary_with_a_python_scalar_leaf():
    s = lj.summary({**PARAMS, "step": 3}, _lora())
    assert s.total_params == 6 * 5 + 5 + 5 * 3 + 1 + s.trainable_params


def test_raw_exceptions_of_the_new_surface_are_clear_errors(tmp_path):
    """Issue 22's raw exceptions: each is a TypeError/ValueError/IndexError naming the function."""
    import dataclasses

    params = {"d": {"kernel": jnp.ones((4, 3))}}
    lora = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2))
    with pytest.raises(TypeError, match=r"lora_jax\.combine: key must be one PRNG key .*found int"):
        lj.combine([lora, lora], [1, 1], "dare_linear", density=0.5, key=3)
    with pytest.raises(TypeError, match=r"lora_jax\.init_residual: key must be one PRNG key"):
        lj.init_residual(3, params, lj.LoraConfig(rank=2, init="pissa"))
    with pytest.raises(TypeError, match=r"lora_jax\.init_residual: config must be a lora_jax\.LoraConfig, found dict"):
        lj.init_residual(jax.random.key(0), params, {"rank": 2})
    with pytest.raises(TypeError, match=r"lora_jax\.init: key must be one PRNG key"):
        lj.init("key", params, lj.LoraConfig(rank=2))
    bank = lj.bank([lora, lora])
    with pytest.raises(TypeError, match=r"lora_jax\.bank_remove: removing a slot changes the bank's shapes"):
        jax.jit(lambda i: lj.bank_remove(bank, i))(0)
    with pytest.raises(ValueError, match=r"roles \('out', 'in', 'stack'\) need a \(stack\.\.\., in\.\.\., r\)"):
        lj.Adapter(jnp.ones((4, 2)), jnp.ones((2, 3)), rank=2, alpha=1.0, roles=("out", "in", "stack"))

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class Gain:
        g: jax.Array

    with pytest.raises(TypeError, match=r"lora_jax\.extend\.register_kind: the kind's name .* must be a non-empty str, found 3"):
        lj.extend.register_kind(Gain, lj.extend.Kind(name=3, axes=lambda ad: {"g": (1,)}, merge=lambda w, ad: w, unmerge=None))
    lj.to_peft(tmp_path, lora)
    with pytest.raises(TypeError, match=r"lora_jax\.from_peft: name_map must return a non-empty str for 'd/kernel'"):
        lj.from_peft(tmp_path, params, name_map=lambda path: None)
