"""lj.combine: adapter arithmetic, checked against PEFT's add_weighted_adapter on the same tensors
(the merged ΔW of the combined adapter), and its bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize

import lora_jax as lj

PARAMS = {"fc1": {"kernel": jnp.zeros((8, 12))}, "fc2": {"kernel": jnp.zeros((12, 6))}}
ZERO = jax.tree.map(jnp.zeros_like, PARAMS)


def _trees(ranks=(4, 4, 4), seed=0):
    return [
        randomize(lj.init(jax.random.key(seed + i), PARAMS, lj.LoraConfig(rank=r, alpha=2.0 * r + i)), jax.random.key(9 + i))
        for i, r in enumerate(ranks)
    ]


def _delta(tree):
    """ΔW of every kernel of a tree, (in, out)."""
    merged = lj.apply_lora(ZERO, tree)
    return {name: np.asarray(merged[name]["kernel"]) for name in merged}


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 12), torch.nn.Linear(12, 6)

        def forward(self, x):
            return self.fc2(self.fc1(x))

    def load(trees, names):
        root = tmp_path_factory.mktemp("peft")
        model = None
        for tree, name in zip(trees, names):
            lj.to_peft(root / name, tree)
            if model is None:
                model = peft.PeftModel.from_pretrained(MLP(), root / name, adapter_name=name)
            else:
                model.load_adapter(root / name, adapter_name=name)
        return model

    return load, torch


PEFT_CASES = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 3}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}),
    ("ties_svd", {"density": 0.6}),
    ("magnitude_prune_svd", {"density": 0.5}),
    ("dare_linear", {"density": 1.0}),  # no pruning: PEFT's torch masks cannot be reproduced
    ("dare_ties", {"density": 1.0}),
]
pytestmark = pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1")


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("method, options", PEFT_CASES)
def test_the_combined_delta_equals_peft(peft_model, method, options):
    load, torch = peft_model
    trees = _trees()
    weights = [1.0, -0.7, 0.4]
    model = load(trees, ["x", "y", "z"])
    model.add_weighted_adapter(["x", "y", "z"], weights, "new", combination_type=method, **options)
    ours = lj.combine(
        trees, weights, method, rank=options.get("svd_rank"), density=options.get("density"),
        majority_sign_method=options.get("majority_sign_method", "total"), key=jax.random.key(0),
    )  # fmt: skip
    got = _delta(ours)
    for name in ("fc1", "fc2"):
        want = getattr(model.base_model.model, name).get_delta_weight("new").detach().numpy().T
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_cat_is_exact_and_ranks_add():
    trees = _trees(ranks=(2, 3, 5))
    both = lj.combine(trees, [1.0, 2.0, -1.0], "cat")
    assert both["fc1"]["kernel"].rank == 10 and both["fc1"]["kernel"].scale == 1.0
    want = sum(w * d["fc1"] for w, d in zip([1.0, 2.0, -1.0], map(_delta, trees)))
    np.testing.assert_allclose(_delta(both)["fc1"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_svd_of_one_adapter_at_its_rank_is_exact_and_stacks_are_per_layer():
    params = {"layers": {"kernel": jnp.zeros((3, 8, 6))}}
    tree = randomize(
        lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2), roles={"layers/kernel": ("stack", "in", "out")}),
        jax.random.key(1),
    )
    again = lj.combine([tree], [1.0], "svd")
    zero = {"layers": {"kernel": jnp.zeros((3, 8, 6))}}
    np.testing.assert_allclose(
        lj.apply_lora(zero, again)["layers"]["kernel"], lj.apply_lora(zero, tree)["layers"]["kernel"], atol=1e-5
    )
    pruned = lj.combine([tree, tree], [1.0, 1.0], "ties", density=0.5)
    a = np.asarray(pruned["layers"]["kernel"].a)
    assert [(a[i] != 0).sum() for i in range(3)] == [8, 8, 8]  # half of each layer's 8 x 2 entries, per layer


@pytest.mark.slow
def test_dare_keeps_about_density_and_is_deterministic_given_the_key():
    params = {"big": {"kernel": jnp.zeros((64, 48))}}
    tree = randomize(lj.init(jax.random.key(0), params, lj.LoraConfig(rank=16)), jax.random.key(1))
    one, two, other = (
        lj.combine([tree], [1.0], "dare_linear", density=0.3, key=jax.random.key(k)) for k in (5, 5, 6)
    )
    a1, a2, a3 = (np.asarray(t["big"]["kernel"].a) for t in (one, two, other))
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, a3)
    assert 0.25 < (a1 != 0).mean() < 0.35  # 1,024 entries kept with probability 0.3
    s = tree["big"]["kernel"].scale
    base_a = np.asarray(tree["big"]["kernel"].a) * np.sqrt(s)
    np.testing.assert_allclose(a1[a1 != 0], base_a[a1 != 0] / 0.3, rtol=1e-5)  # the kept entries, rescaled


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda t: lj.combine(t, [1.0, 1.0, 1.0], "mean"), ValueError, "method must be one of"),
        (lambda t: lj.combine(t, [1.0, 1.0], "linear"), ValueError, "weights must be a list of 3 numbers"),
        (lambda t: lj.combine(t, [1.0, 1.0, float("nan")], "linear"), TypeError, "weights must be finite"),
        (lambda t: lj.combine(t, [1.0] * 3, "ties"), ValueError, r"needs density in \(0, 1\], found None"),
        (lambda t: lj.combine(t, [1.0] * 3, "ties", density=0.0), ValueError, "needs density"),
        (lambda t: lj.combine(t, [1.0] * 3, "ties", density=1.5), ValueError, "needs density"),
        (lambda t: lj.combine(t, [1.0] * 3, "dare_ties", density=0.5), ValueError, "pass key="),
        (lambda t: lj.combine(t, [1.0] * 3, "ties", density=0.5, majority_sign_method="max"), ValueError,
         "majority_sign_method"),
        (lambda t: lj.combine([], [], "cat"), TypeError, "non-empty list"),
    ],
)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call(_trees())


def test_linear_needs_equal_ranks_and_the_same_kernels():
    with pytest.raises(ValueError, match=r"needs equal ranks, found \[2, 4\]"):
        lj.combine(_trees(ranks=(2, 4)), [1.0, 1.0], "linear")
    one = _trees(ranks=(4,))[0]
    partial = {"fc1": _trees(ranks=(4,), seed=3)[0]["fc1"]}
    with pytest.raises(ValueError, match=r"tree 1 lacks \['fc2/kernel'\]"):
        lj.combine([one, partial], [1.0, 1.0], "linear")
    both = lj.combine([one, partial], [1.0, 1.0], "cat")  # absent = zero for cat and svd
    assert both["fc2"]["kernel"].rank == 4 and both["fc1"]["kernel"].rank == 8


def test_weights_that_overflow_float32_are_refused():
    params = {"d": {"kernel": jnp.zeros((6, 4))}}
    trees = [randomize(lj.init(jax.random.key(i), params, lj.LoraConfig(rank=2)), jax.random.key(5 + i)) for i in (0, 1)]
    with pytest.raises(ValueError, match=r"make the combined adapters of \['d/kernel'\] overflow"):
        lj.combine(trees, [1e300, 1.0], "linear")
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(lj.combine(trees, [1e3, 1.0], "linear")))


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_adapters_of_kernels_of_other_shapes_are_refused(method):
    """Two trees with one path but kernels of other shapes (adapters of two different models)."""
    one = lj.init(jax.random.key(0), {"d": {"kernel": jnp.ones((8, 4))}}, lj.LoraConfig(rank=2))
    other = lj.init(jax.random.key(1), {"d": {"kernel": jnp.ones((6, 4))}}, lj.LoraConfig(rank=2))
    with pytest.raises(ValueError, match=r"the adapters of 'd/kernel' fit kernels of different shapes \[\(6, 4\), \(8, 4\)\]"):
        lj.combine([one, other], [1.0, 1.0], method)
