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


def _params(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "enc": {"q": {"kernel": jax.random.normal(k[0], (6, 5), dtype), "bias": jnp.arange(5, dtype=dtype)}},
        "stack": {"kernel": jax.random.normal(k[1], (3, 6, 5), dtype)},
        "step": jnp.array(7, jnp.int32),
    }


def _bits(x):
    return np.atleast_1d(np.asarray(x)).view(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_and_merged_export_are_bit_exact(tmp_path, dtype):
    params = _params(dtype)
    lj.save_params(tmp_path / "base.safetensors", params)
    loaded = lj.load_params(tmp_path / "base.safetensors")
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for u, v in leaf_pairs(loaded, params):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(_bits(u), _bits(v))

    roles = {"stack/kernel": ("stack", "in", "out")}
    lora = randomize(lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2), roles=roles), jax.random.key(2))
    lj.save_params(tmp_path / "merged.safetensors", params, lora)
    merged = lj.load_params(tmp_path / "merged.safetensors")
    for u, v in leaf_pairs(merged, lj.apply_lora(params, lora)):
        np.testing.assert_array_equal(_bits(u), _bits(v))
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "merged.safetensors"]


def test_file_is_standard_safetensors(tmp_path):
    lj.save_params(tmp_path / "m.safetensors", _params())
    with safetensors.safe_open(tmp_path / "m.safetensors", framework="numpy") as f:
        assert sorted(f.keys()) == ["enc/q/bias", "enc/q/kernel", "stack/kernel", "step"]
        np.testing.assert_array_equal(f.get_tensor("enc/q/bias"), np.arange(5, dtype=np.float32))


def test_nnx_state_keys(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(2)])

    _, state = nnx.split(Net(nnx.Rngs(0)))
    lj.save_params(tmp_path / "m.safetensors", state)
    assert set(lj.load_params(tmp_path / "m.safetensors")["layers"]) == {0, 1}


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lora_jax\.load_params: no parameter file at"):
        lj.load_params(tmp_path / "nope.safetensors")
    file = tmp_path / "m.safetensors"
    lj.save_params(file, _params())
    file.write_bytes(file.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        lj.load_params(file)
    file.write_bytes(safetensors.numpy.save({"w": np.ones(2, np.float32)}))
    with pytest.raises(ValueError, match=r"has no valid lora_jax parameter metadata.*lj\.save_params"):
        lj.load_params(file)
    bad = lj.init(jax.random.key(0), {"other": {"kernel": jnp.ones((4, 4))}}, lj.LoraConfig(rank=1))
    with pytest.raises(
        ValueError, match=r"lora_jax\.save_params: adapters do not fit params:\n  'other/kernel': no such parameter"
    ):
        lj.save_params(tmp_path / "x.safetensors", _params(), bad)
    assert not (tmp_path / "x.safetensors").exists()
