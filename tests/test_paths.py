import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax._core import paths as _paths


def test_linen_and_nnx_paths():
    linen = {"decoder": {"layers_0": {"attn": {"query": {"kernel": jnp.ones((2, 2))}}}}}
    assert [_paths.join(k) for k, _ in _paths.leaves_with_paths(linen)] == ["decoder/layers_0/attn/query/kernel"]

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs)])

    _, state = nnx.split(Net(nnx.Rngs(0)))
    keys = [k for k, _ in _paths.leaves_with_paths(state)]
    assert keys == [("layers", 0, "bias"), ("layers", 0, "kernel")]


def test_sequences_and_nest_inverse():
    tree = {"blocks": [{"w": jnp.ones(1)}, {"w": jnp.zeros(1)}]}
    flat = _paths.leaves_with_paths(tree)
    assert [k for k, _ in flat] == [("blocks", 0, "w"), ("blocks", 1, "w")]
    assert _paths.nest(flat) == {"blocks": {0: {"w": flat[0][1]}, 1: {"w": flat[1][1]}}}


def test_patterns_fullmatch():
    match = _paths.compile_pattern(["a/.*/kernel", "head"], "targets", "test")
    assert match("a/b/kernel", None) and match("head", None)
    assert not match("x/a/b/kernel", None) and not match("a/b/kernel/extra", None) and not match("head2", None)
    assert _paths.first_match({"q": 1, ".*": 2}, "q") == "q"
    assert _paths.first_match({"q": 1}, "k") is None
    assert _paths.compile_pattern(None, "exclude", "test") is None
    assert jax.tree.leaves(_paths.nest([])) == []
