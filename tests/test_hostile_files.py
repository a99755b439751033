"""Hostile files: every loader, given a damaged file, returns exactly the original data or
raises ValueError / TypeError / OSError; never another exception, never different data.

Valid files from `save`, `save_params` and `to_peft` are damaged by hypothesis: flipped bytes
(header and data), truncations, and mutations of the header's JSON.
"""

import dataclasses
import json
import os
import shutil
import struct
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import leaf_pairs, randomize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_jax as lj

PARAMS = {
    "enc": {"q": {"kernel": jnp.arange(30.0).reshape(6, 5) / 7, "bias": jnp.ones(5)}},
    "conv": {"kernel": jnp.ones((3, 3, 2, 4))},
    "step": jnp.array(3, jnp.int32),
}
ROLES = {"conv/kernel": ("in", "in", "in", "out")}
CONFIG = lj.LoraConfig(rank=2, alpha=3, targets=".*/kernel", rank_pattern={"conv/kernel": 1})
ADAPTERS = randomize(lj.init(jax.random.key(0), PARAMS, CONFIG, roles=ROLES), jax.random.key(1))
EXAMPLES = 150  # per loader and kind of damage: 1,050 damaged files in all

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_ACCEPTED = (ValueError, TypeError, OSError)


def _same_tree(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)  # adapters' static fields included
    for u, v in leaf_pairs(got, want):
        assert np.asarray(u).dtype == np.asarray(v).dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    lj.save(root / "adapter.safetensors", ADAPTERS)
    lj.save_params(root / "params.safetensors", PARAMS, ADAPTERS)
    lj.to_peft(root / "peft", {"enc": ADAPTERS["enc"]})
    return root


def _flip(data: bytes, position: int, xor: int) -> bytes:
    position %= len(data)
    return data[:position] + bytes([data[position] ^ xor]) + data[position + 1 :]


def _mutate_header(data: bytes, choice: int, value) -> bytes:
    """Replace one value (or a key) of the safetensors header's JSON."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    slots = []

    def walk(node):
        if isinstance(node, dict):
            for k in list(node):
                slots.append((node, k))
                walk(node[k])
        elif isinstance(node, list):
            for i in range(len(node)):
                slots.append((node, i))
                walk(node[i])

    walk(header)
    node, key = slots[choice % len(slots)]
    if isinstance(node, dict) and isinstance(value, str):
        node[value] = node.pop(key)  # rename a key
    else:
        node[key] = value
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data[8 + n :]


_DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("header"), st.integers(0, 10**4), _JSON),
)


def _damage(data: bytes, damage) -> bytes:
    kind, n, extra = damage
    if kind == "flip":
        return _flip(data, n, extra)
    if kind == "truncate":
        return data[: n % len(data)]
    return _mutate_header(data, n, extra)


def _check(load, want):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # from_peft warns about unknown config keys
            got = load()
    except _ACCEPTED:
        return
    _same_tree(got, want)


@settings(max_examples=EXAMPLES * 3, deadline=None, suppress_health_check=list(HealthCheck))
@given(damage=_DAMAGE)
def test_damaged_adapter_file(files, tmp_path_factory, damage):
    file = tmp_path_factory.mktemp("d") / "adapter.safetensors"
    file.write_bytes(_damage((files / "adapter.safetensors").read_bytes(), damage))
    _check(lambda: lj.load(file), ADAPTERS)


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=list(HealthCheck))
@given(damage=_DAMAGE)
def test_damaged_params_file(files, tmp_path_factory, damage):
    file = tmp_path_factory.mktemp("d") / "params.safetensors"
    file.write_bytes(_damage((files / "params.safetensors").read_bytes(), damage))
    _check(lambda: lj.load_params(file), lj.load_params(files / "params.safetensors"))


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=list(HealthCheck))
@given(damage=_DAMAGE, in_config=st.booleans(), config_value=_JSON)
def test_damaged_peft_directory(files, tmp_path_factory, damage, in_config, config_value):
    directory = tmp_path_factory.mktemp("d") / "peft"
    shutil.copytree(files / "peft", directory)
    want = lj.from_peft(files / "peft", PARAMS)
    if in_config:  # bytes of the JSON config flipped or cut, or one of its values replaced
        path = directory / "adapter_config.json"
        if damage[0] == "header":
            config = json.loads(path.read_text())
            key = sorted(config)[damage[1] % len(config)]
            config[key] = config_value
            path.write_text(json.dumps(config))
        else:
            path.write_bytes(_damage(path.read_bytes(), damage))
        want = _with_edited_dropout(want, path)
    else:
        path = directory / "adapter_model.safetensors"
        path.write_bytes(_damage(path.read_bytes(), damage))
    _check(lambda: lj.from_peft(directory, PARAMS), want)


def _with_edited_dropout(want, path):
    """Another valid dropout rate in the config (a replaced value, or a flipped digit: "0.0" to
    "0.1") is an edit, not damage: training only, so the weights do not record it, and the
    adapters come back with it."""
    try:
        rate = json.loads(path.read_bytes()).get("lora_dropout")
    except (ValueError, AttributeError):
        return want
    if not (isinstance(rate, float) and 0 <= rate < 1):
        return want
    return jax.tree.map(lambda ad: dataclasses.replace(ad, dropout=rate), want, is_leaf=lambda x: isinstance(x, lj.Adapter))


def test_valid_files_load_exactly(files):
    _same_tree(lj.load(files / "adapter.safetensors"), ADAPTERS)
    merged = lj.load_params(files / "params.safetensors")
    _same_tree(merged, jax.tree.map(np.asarray, lj.apply_lora(PARAMS, ADAPTERS)))
    assert sorted(os.listdir(files / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
