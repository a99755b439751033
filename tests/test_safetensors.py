"""The one safetensors writer and reader: atomic, streaming, umask-respecting, validating first."""

import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import leaf_pairs

import lora_jax as lj
from lora_jax._files import safetensors as _safetensors


def _tensor(name, value):
    value = np.asarray(value)
    return _safetensors.Tensor(name, value.shape, value.dtype, lambda: value)


def test_round_trip_in_declared_order(tmp_path):
    file = tmp_path / "t.safetensors"
    values = {"z": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array(3, np.int32), "m": np.ones(0, np.float16)}
    _safetensors.write(file, [_tensor(k, v) for k, v in values.items()], {"k": "v"}, "test")
    loaded = safetensors.numpy.load_file(file)
    assert loaded.keys() == values.keys()
    for k, v in values.items():
        np.testing.assert_array_equal(loaded[k], v)
        assert loaded[k].shape == v.shape and loaded[k].dtype == v.dtype


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_file_mode_follows_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        lj.save_params(tmp_path / "p.safetensors", {"w": jnp.ones(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "p.safetensors").st_mode) == 0o666 & ~mask


def test_failure_midway_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    file = tmp_path / "t.safetensors"
    _safetensors.write(file, [_tensor("w", np.ones(3, np.float32))], {}, "test")
    before = file.read_bytes()

    def boom():
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        _safetensors.write(file, [_tensor("w", np.zeros(3, np.float32)), _safetensors.Tensor("x", (2,), np.dtype("float32"), boom)], {}, "test")
    assert file.read_bytes() == before and os.listdir(tmp_path) == ["t.safetensors"]
    wrong = _safetensors.Tensor("w", (3,), np.dtype("float32"), lambda: np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"test: 'w' was declared float32\[3\], produced float32\[4\]"):
        _safetensors.write(file, [wrong], {}, "test")
    assert file.read_bytes() == before and os.listdir(tmp_path) == ["t.safetensors"]


def test_bad_tensors_refused_before_writing(tmp_path):
    file = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match=r"test: 'c' has dtype complex64, which safetensors cannot store"):
        _safetensors.write(file, [_tensor("c", np.ones(2, np.complex64))], {}, "test")
    with pytest.raises(ValueError, match=r"test: two tensors are named 'w'"):
        _safetensors.write(file, [_tensor("w", np.ones(2)), _tensor("w", np.ones(2))], {}, "test")
    assert not file.exists()


def test_foreign_file_refused_by_its_metadata_without_reading_a_tensor(tmp_path, monkeypatch):
    file = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"big": np.zeros((512, 1024), np.float32)}, file)
    real = _safetensors.reading

    def spy(*args):
        reader = real(*args)
        r = reader.__enter__()
        return _Closing(reader, r._replace(get=lambda name: pytest.fail(f"read {name} before validating")))

    monkeypatch.setattr(_safetensors, "reading", spy)
    with pytest.raises(ValueError, match=r"has no lora_jax metadata"):
        lj.load(file)
    with pytest.raises(ValueError, match=r"has no valid lora_jax parameter metadata"):
        lj.load_params(file)
    peft_dir = tmp_path / "peft"
    lj.to_peft(peft_dir, lj.init(jax.random.key(0), {"q": {"kernel": jnp.ones((4, 3))}}, lj.LoraConfig(rank=1)))
    os.replace(file, peft_dir / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"holds keys that are not LoRA A/B weights .*\['big'\]"):
        lj.from_peft(peft_dir, {"q": {"kernel": jnp.ones((4, 3))}})


class _Closing:
    def __init__(self, context, value):
        self.context, self.value = context, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


# ---- a writer killed at random moments -----------------------------------------------------

_WRITER = """
import sys, jax, lora_jax as lj
sys.path.insert(0, {tests!r})
from test_safetensors import adapter_pair
pair = adapter_pair()
i = 0
while True:
    lj.save({file!r}, pair[i % 2])
    lj.to_peft({directory!r}, pair[i % 2])
    if i == 1:
        print("ready", flush=True)
    i += 1
"""


def adapter_pair():
    """Two adapter trees, big enough that a write takes a while, made the same way in any process."""
    params = {f"layer_{i}": {"kernel": jnp.zeros((256, 256))} for i in range(6)}
    fresh = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=32))
    return [jax.tree.map(lambda x, s=seed: x + s + jnp.arange(x.size).reshape(x.shape) % 7, fresh) for seed in (1, 2)]


def _equal(u, v):
    return jax.tree.structure(u) == jax.tree.structure(v) and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaf_pairs(u, v)
    )


@pytest.mark.slow
def test_writer_killed_at_random_moments_leaves_old_or_new(tmp_path):
    import random
    import signal
    import subprocess
    import sys
    import time

    tests = os.path.dirname(os.path.abspath(__file__))
    file, directory = str(tmp_path / "ad.safetensors"), str(tmp_path / "peft")
    script = _WRITER.format(tests=tests, file=file, directory=directory)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(tests), JAX_PLATFORMS="cpu")
    pair = adapter_pair()
    rng = random.Random(0)
    kinds = set()
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = lj.load(file)
        assert _equal(loaded, pair[0]) or _equal(loaded, pair[1])  # old or new, exactly
        try:
            imported = lj.from_peft(directory, {f"layer_{i}": {"kernel": jnp.zeros((256, 256))} for i in range(6)})
            assert _equal(imported, pair[0]) or _equal(imported, pair[1])
            kinds.add("pair")
        except ValueError as e:  # killed between the two renames: detected, never mixed
            assert "written together with another adapter_config.json" in str(e)
            kinds.add("detected")
        kinds.update("temp left" for f in os.listdir(tmp_path) if f.endswith(".tmp"))
    lj.save(file, pair[0])
    lj.to_peft(directory, pair[0])
    leftovers = [f for d in (tmp_path, tmp_path / "peft") for f in os.listdir(d) if f.endswith(".tmp")]
    assert not leftovers, leftovers  # the next successful save removes what a killed one left
    assert kinds & {"pair", "detected"}
