"""Shared test helpers: independent float64 NumPy references and small models."""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def leaf_pairs(got, want, *more):
    """The leaves of trees that must have one structure, paired in order: a difference in
    structure (a missing leaf, another nesting, other static metadata) fails here, where a plain
    ``zip`` of the leaves would pass silently."""
    chex.assert_trees_all_equal_structs(got, want, *more)
    return zip(jax.tree.leaves(got), jax.tree.leaves(want), *map(jax.tree.leaves, more), strict=True)


def reference_delta(a, b, roles, scale):
    """scale · ΔW in float64, by transposing to (stack, in, out), batched matmul, and back."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    roles = list(roles)
    idx = {r: [i for i, x in enumerate(roles) if x == r] for r in ("stack", "in", "out")}
    n_stack = len(idx["stack"])
    stack_shape, in_shape = a.shape[:n_stack], a.shape[n_stack:-1]
    out_shape = b.shape[n_stack + 1 :]
    r = a.shape[-1]
    s = int(np.prod(stack_shape))
    a3 = a.reshape(s, -1, r)
    b3 = b.reshape(s, r, -1)
    d = np.matmul(a3, b3).reshape(*stack_shape, *in_shape, *out_shape)
    order = idx["stack"] + idx["in"] + idx["out"]  # axis k of d is kernel axis order[k]
    return scale * np.transpose(d, np.argsort(order))


def reference_merge(w, adapter):
    return np.asarray(w, np.float64) + reference_delta(adapter.a, adapter.b, adapter.roles, adapter.scale)


def randomize(adapters, key, std=0.5):
    """A 'trained' adapter tree: every array replaced by random normal values."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [std * jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves)]
    )


class MLP(nn.Module):
    """A small two-layer Linen model used across tests."""

    hidden: int = 16
    out: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(self.out, name="fc2")(x)


class ScanBlock(nn.Module):
    """One block of :class:`Scanned`: ``h + tanh(Dense(h))``, the Dense named ``mix``."""

    use_bias: bool = True

    @nn.compact
    def __call__(self, h, _):
        return h + jnp.tanh(nn.Dense(h.shape[-1], use_bias=self.use_bias, name="mix")(h)), None


class Scanned(nn.Module):
    """``length`` blocks stacked by ``nn.scan`` under ``blocks``: the kernel ``blocks/mix/kernel``
    is ``(length, d, d)`` with roles ``("stack", "in", "out")``."""

    length: int = 3
    use_bias: bool = True

    @nn.compact
    def __call__(self, h):
        scan = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.length)
        return scan(use_bias=self.use_bias, name="blocks")(h, None)[0]


def torch_mlp(params):
    """A PyTorch twin of :class:`MLP` (``fc1 → relu → fc2``) holding the Flax ``params``'
    weights (kernels transposed); skips the test where torch is not installed."""
    torch = pytest.importorskip("torch")

    class TorchMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(*params["fc1"]["kernel"].shape)
            self.fc2 = torch.nn.Linear(*params["fc2"]["kernel"].shape)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    net = TorchMLP()
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(net, name).weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).T))
            getattr(net, name).bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
    return net


@pytest.fixture
def twins():
    """The test MLP, its params, an input, a factory of its PyTorch twin, torch and peft (the
    test is skipped where they are not installed)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = MLP(out=6)
    x = jax.random.normal(jax.random.key(0), (5, 8))
    params = model.init(jax.random.key(1), x)["params"]
    return model, params, x, lambda: torch_mlp(params), torch, peft


@pytest.fixture
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(1), (5, 8))
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


# tests/sharded/ needs 8 (simulated) devices, set before JAX starts: test_sharding.py runs it
# in a subprocess.
collect_ignore = ["sharded"]


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRATCH = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", ".mypy_cache"}


def _tree_files():
    """Every file of the working tree but version control, the venv, caches and example runs."""
    found = set()
    for directory, subdirs, files in os.walk(_ROOT):
        subdirs[:] = [d for d in subdirs if d not in _SCRATCH and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(directory, f), _ROOT) for f in files)
    return found


@pytest.fixture(scope="session", autouse=True)
def suite_writes_nothing_into_the_working_tree():
    """Tests write into tmp_path only: a file left in the repository (such as a stray 'step') fails the run."""
    before = _tree_files()
    yield
    written = sorted(_tree_files() - before)
    assert not written, f"the test suite wrote into the working tree: {written}"
