import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from conftest import leaf_pairs, randomize
from flax import nnx

import lora_jax as lj
from lora_jax._files import safetensors as _safetensors


def _adapters(dtype=jnp.float32):
    params = {
        "enc": {"q": {"kernel": jnp.ones((6, 5))}, "stack": {"kernel": jnp.ones((3, 6, 5))}},
        "conv": {"kernel": jnp.ones((3, 3, 2, 4))},
    }
    roles = {"enc/stack/kernel": ("stack", "in", "out"), "conv/kernel": ("in", "in", "in", "out")}
    cfg = lj.LoraConfig(rank=2, alpha=3, rank_pattern={"conv/kernel": 1}, use_rslora=True, dropout=0.1, dtype=dtype)
    return randomize(lj.init(jax.random.key(0), params, cfg, roles=roles), jax.random.key(1))


def _assert_identical(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in leaf_pairs(x, y):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(np.asarray(u).view(np.uint8), np.asarray(v).view(np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    ad = _adapters(dtype)
    lj.save(tmp_path / "ad.safetensors", ad)
    _assert_identical(lj.load(tmp_path / "ad.safetensors"), ad)
    assert os.listdir(tmp_path) == ["ad.safetensors"]  # no temporary file left behind


def test_round_trip_nnx_integer_keys(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])

    _, state = nnx.split(Net(nnx.Rngs(0)))
    ad = lj.init(jax.random.key(0), state, lj.LoraConfig(rank=2))
    lj.save(str(tmp_path / "ad.safetensors"), ad)
    loaded = lj.load(str(tmp_path / "ad.safetensors"))
    assert set(loaded["layers"]) == {0, 1}
    _assert_identical(loaded, ad)
    lj.apply_lora(state, loaded)  # still fits the State


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    lj.save(tmp_path / "ad.safetensors", _adapters())
    with safetensors.safe_open(tmp_path / "ad.safetensors", framework="numpy") as f:
        assert sorted(f.keys()) == [
            "conv/kernel/a",
            "conv/kernel/b",
            "enc/q/kernel/a",
            "enc/q/kernel/b",
            "enc/stack/kernel/a",
            "enc/stack/kernel/b",
        ]
        meta = json.loads(f.metadata()["lora_jax"])
    assert meta["version"] == 2 and meta["adapters"]["conv/kernel"]["kind"] == "lora"
    assert meta["adapters"]["conv/kernel"]["static"]["rank"] == 1
    assert meta["adapters"]["enc/stack/kernel"]["static"]["roles"] == ["stack", "in", "out"]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    file = tmp_path / "ad.safetensors"
    lj.save(file, _adapters())
    before = file.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        lj.save(file, randomize(_adapters(), jax.random.key(9)))
    assert file.read_bytes() == before
    assert os.listdir(tmp_path) == ["ad.safetensors"]


def test_save_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"lora_jax\.save: the adapter tree is empty"):
        lj.save(tmp_path / "x", {})
    with pytest.raises(TypeError, match=r"lora_jax\.save: adapters must be a tree of lora_jax\.Adapter"):
        lj.save(tmp_path / "x", {"w": jnp.ones(2)})
    ad = _adapters()["enc"]["q"]["kernel"]
    with pytest.raises(ValueError, match=r"keys must be str or int without '/', found \('a/b',\)"):
        lj.save(tmp_path / "x", {"a/b": ad})
    assert not os.listdir(tmp_path)


# ---- load of bad files ----------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lora_jax\.load: no adapter checkpoint at '.*nope\.safetensors'"):
        lj.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 100, -7])
def test_truncated_file(tmp_path, keep):
    file = tmp_path / "ad.safetensors"
    lj.save(file, _adapters())
    file.write_bytes(file.read_bytes()[:keep])
    with pytest.raises(ValueError, match=r"is not a readable safetensors file \(\d+ bytes; truncated or corrupt\?\)"):
        lj.load(file)


def test_flipped_byte_in_array_data_fails_checksum(tmp_path):
    file = tmp_path / "ad.safetensors"
    lj.save(file, _adapters())
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"the tensor 'enc/stack/kernel/b' fails its checksum \(the file is corrupt\)"):
        lj.load(file)


def _rewrite(file, tensors, meta):
    """Write a tampered file as lora_jax writes files (checksummed), so the metadata checks are reached."""
    meta = {k: v for k, v in (meta or {}).items() if k != _safetensors.CHECKSUMS}
    _safetensors.write(file, [_safetensors.Tensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()], meta, "test")


def _read(file):
    with _safetensors.reading(file, "test", "file") as f:
        tensors, meta = {name: f.get(name) for name in f.names}, f.metadata
    return tensors, meta, json.loads(meta["lora_jax"])


def test_not_a_lora_jax_file(tmp_path):
    file = tmp_path / "other.safetensors"
    _rewrite(file, {"w": np.ones(3, np.float32)}, None)
    with pytest.raises(ValueError, match=r"has no lora_jax metadata.*use lj\.from_peft"):
        lj.load(file)


@pytest.mark.parametrize(
    "tamper, match",
    [
        (
            lambda t, d: d["adapters"]["enc/q/kernel"]["static"].update(rank=3),
            r"'enc/q/kernel': lora_jax.Adapter: a \(6, 2\) and b \(2, 5\) do not fit: rank 3",
        ),
        (
            lambda t, d: d["adapters"]["enc/q/kernel"]["static"].update(roles=["in", "sideways"]),
            r"unknown roles \['sideways'\]",
        ),
        (
            lambda t, d: d["adapters"]["enc/q/kernel"]["static"].update(roles=["stack", "in", "out"]),
            r"array 'a' \(6, 2\) has 2 axes, its Adapter .* needs 3",
        ),
        (
            lambda t, d: d["adapters"]["conv/kernel"]["static"].update(alpha=-1),
            r"'conv/kernel': lora_jax.Adapter: alpha must be > 0 and finite, found -1",
        ),
        (
            lambda t, d: d["adapters"]["conv/kernel"]["static"].pop("rank"),
            r"'conv/kernel': .*missing 1 required keyword-only argument: 'rank'|'conv/kernel': .*'rank'",
        ),
        (lambda t, d: d["adapters"]["conv/kernel"].update(kind="vera"), r"adapter kind 'vera' is not registered"),
        (lambda t, d: d["adapters"]["conv/kernel"].update(kind="dora"), r"arrays \['a', 'b'\] are not those of a DoraAdapter"),
        (lambda t, d: d["adapters"]["conv/kernel"].update(keys=["x"]), r"metadata keys \['x'\] do not spell the path"),
        (lambda t, d: t.pop("enc/q/kernel/a"), r"'enc/q/kernel': array 'a' is missing"),
        (
            lambda t, d: t.update({"extra/a": np.ones(2, np.float32)}),
            r"'extra/a': an array not described by the metadata",
        ),
        (lambda t, d: d.update(version=99), r"format version 99, this lora_jax reads version 2"),
        (lambda t, d: d.pop("adapters"), r"its lora_jax metadata is not valid"),
    ],
)
def test_metadata_inconsistent_with_arrays(tmp_path, tamper, match):
    file = tmp_path / "ad.safetensors"
    lj.save(file, _adapters())
    tensors, meta, doc = _read(file)
    tamper(tensors, doc)
    _rewrite(file, tensors, {"lora_jax": json.dumps(doc)})
    with pytest.raises(ValueError, match=match):
        lj.load(file)


def test_integer_array_rejected(tmp_path):
    file = tmp_path / "ad.safetensors"
    lj.save(file, _adapters())
    tensors, meta, doc = _read(file)
    tensors["enc/q/kernel/a"] = tensors["enc/q/kernel/a"].astype(np.int32)
    _rewrite(file, tensors, meta)
    with pytest.raises(ValueError, match=r"array 'a' has dtype int32, expected a floating dtype"):
        lj.load(file)


def test_every_problem_in_one_message(tmp_path):
    file = tmp_path / "ad.safetensors"
    lj.save(file, _adapters())
    tensors, _, doc = _read(file)
    tensors.pop("enc/q/kernel/b")
    doc["adapters"]["conv/kernel"]["static"]["rank"] = 0
    _rewrite(file, tensors, {"lora_jax": json.dumps(doc)})
    with pytest.raises(
        ValueError, match=r"(?s)'conv/kernel': lora_jax.Adapter: rank must be >= 1.*'enc/q/kernel': array 'b' is missing"
    ):
        lj.load(file)


def test_garbage_metadata_json(tmp_path):
    file = tmp_path / "ad.safetensors"
    _rewrite(file, {"w/a": np.ones((2, 1), np.float32)}, {"lora_jax": "{not json"})
    with pytest.raises(ValueError, match=r"its lora_jax metadata is not valid"):
        lj.load(file)
