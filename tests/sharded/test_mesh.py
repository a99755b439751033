"""LoRA on a 2x2x2 mesh of simulated CPU devices equals the single-device run.

Run through tests/test_sharding.py (XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

import os
import re
import sys

import jax
import numpy as np
import optax
import pytest
from conftest import leaf_pairs
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
from gpt import GPT, GPTConfig
from sharded_finetune import TARGETS, param_specs, train_step

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 devices")

CFG = GPTConfig(vocab=64, max_len=16, features=32, heads=4, layers=2)
MODEL = GPT(CFG)
TOKENS = jax.random.randint(jax.random.key(0), (3, 8, CFG.max_len), 0, CFG.vocab)  # 3 steps of batch 8
SAMPLE = TOKENS[0]
ROLES = lj.axis_roles(MODEL, SAMPLE)
PARAMS = MODEL.init(jax.random.key(1), SAMPLE)["params"]
CONFIG = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS)
LAYOUTS = {  # layout: (fsdp, tensor, batch spec)
    "data_parallel": (False, False, P(("data", "fsdp", "tensor"), None)),
    "fsdp": (True, False, P(("data", "fsdp"), None)),
    "tensor_parallel": (False, True, P("data", None)),
    "fsdp_and_tensor": (True, True, P(("data", "fsdp"), None)),
}


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def _trained_lora():
    lora = lj.init(jax.random.key(2), PARAMS, CONFIG, roles=ROLES)
    return jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape), lora)  # b != 0


def _run(mesh=None, layout=None):
    tx = optax.adam(1e-2)
    if mesh is None:
        step = train_step(MODEL, tx, None, None, None)
        params, lora = PARAMS, _trained_lora()
    else:
        fsdp, tensor, batch = LAYOUTS[layout]
        specs = param_specs(PARAMS, ROLES, fsdp=fsdp, tensor=tensor)
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        lora_shardings = lj.adapter_shardings(shardings, _trained_lora())
        step = train_step(MODEL, tx, shardings, lora_shardings, NamedSharding(mesh, batch))
        params = jax.device_put(PARAMS, shardings)
        lora = jax.device_put(_trained_lora(), lora_shardings)
    opt_state = tx.init(lora)
    losses = []
    for tokens in TOKENS:
        lora, opt_state, loss = step(params, lora, opt_state, tokens)
        losses.append(float(loss))
    return losses, lora, step, params


@pytest.fixture(scope="module")
def single():
    with jax.default_device(jax.devices()[0]):
        losses, lora, _, _ = _run()
    return losses, lora


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_steps_equal_single_device(mesh, single, layout):
    losses, lora, _, _ = _run(mesh, layout)
    np.testing.assert_allclose(losses, single[0], rtol=1e-5)
    for u, v in leaf_pairs(lora, single[1]):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_adapters_carry_their_kernels_shardings(mesh):
    _, lora, _, params = _run(mesh, "fsdp_and_tensor")
    q, out, fc = (lora["block_0"]["attn"]["query"]["kernel"], lora["block_0"]["attn"]["out"]["kernel"],
                  lora["block_1"]["mlp"]["fc"]["kernel"])  # fmt: skip
    assert params["block_0"]["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert (q.a.sharding.spec, q.b.sharding.spec) == (P("fsdp", None), P(None, "tensor", None))
    assert params["block_0"]["attn"]["out"]["kernel"].sharding.spec == P("tensor", None, None)
    assert (out.a.sharding.spec, out.b.sharding.spec) == (P("tensor", None, None), P(None, None))
    assert (fc.a.sharding.spec, fc.b.sharding.spec) == (P("fsdp", None), P(None, "tensor"))


def test_jitted_init_creates_sharded_adapters(mesh):
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(PARAMS, ROLES))
    make = lambda k: lj.init(k, PARAMS, CONFIG, roles=ROLES)
    lora_shardings = lj.adapter_shardings(shardings, jax.eval_shape(make, jax.random.key(2)))
    lora = jax.jit(make, out_shardings=lora_shardings)(jax.random.key(2))
    eager = make(jax.random.key(2))
    for u, v, s in leaf_pairs(lora, eager, lora_shardings):
        assert u.sharding == s
        np.testing.assert_array_equal(u, v)


def test_tensor_parallel_step_gathers_no_full_kernel(mesh):
    _, lora, step, params = _run(mesh, "tensor_parallel")
    hlo = step.lower(params, lora, optax.adam(1e-2).init(lora), TOKENS[0]).compile().as_text()
    collectives = [line.split(" = ", 1)[1] for line in hlo.splitlines()
                   if re.search(r" = .*? (all-gather|all-reduce|reduce-scatter)(-start)?\(", line)]  # fmt: skip
    assert any(" all-reduce" in c for c in collectives)  # the partial sums of sharded contractions
    gathered = {tuple(int(d) for d in shape.split(",")) for c in collectives if " all-gather" in c
                for shape in re.findall(r"f32\[([\d,]+)\]", c.split(" all-gather")[0])}  # fmt: skip
    kernel_shapes = {tuple(x.shape) for x in jax.tree.leaves(PARAMS) if x.ndim >= 2}
    assert not gathered & kernel_shapes, gathered


def test_merge_and_unmerge_keep_the_base_sharding(mesh):
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(PARAMS, ROLES))
    params = jax.device_put(PARAMS, shardings)
    lora = jax.device_put(_trained_lora(), lj.adapter_shardings(shardings, _trained_lora()))
    merged = lj.apply_lora(params, lora)
    back = lj.unmerge(merged, lora)
    for m, b, p in leaf_pairs(merged, back, params):
        assert m.sharding.is_equivalent_to(p.sharding, p.ndim) and b.sharding.is_equivalent_to(p.sharding, p.ndim)
    for m, ref in leaf_pairs(merged, lj.apply_lora(PARAMS, _trained_lora())):
        np.testing.assert_allclose(m, ref, rtol=1e-6, atol=1e-6)


def test_sharded_save_load_round_trip(mesh, tmp_path):
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(PARAMS, ROLES))
    lora_shardings = lj.adapter_shardings(shardings, _trained_lora())
    lora = jax.device_put(_trained_lora(), lora_shardings)
    lj.save(tmp_path / "ad.safetensors", lora)
    loaded = lj.load(tmp_path / "ad.safetensors", shardings=lora_shardings)
    for u, v in leaf_pairs(loaded, lora):
        assert u.shape == v.shape and u.sharding == v.sharding
        np.testing.assert_array_equal(u, v)


def test_bad_shardings(mesh, tmp_path):
    lora = _trained_lora()
    specs = param_specs(PARAMS, ROLES)
    del specs["block_1"]["mlp"]
    with pytest.raises(
        ValueError, match=r"'block_1/mlp/fc/kernel': no NamedSharding or PartitionSpec in param_shardings"
    ):
        lj.adapter_shardings(specs, lora, mesh=mesh)
    specs = param_specs(PARAMS, ROLES)
    specs["block_0"]["mlp"]["fc"]["kernel"] = P("model", None)
    with pytest.raises(
        ValueError,
        match=r"'block_0/mlp/fc/kernel': P\('model', None\) names mesh axes \['model'\], the mesh has \('data', 'fsdp', 'tensor'\)",
    ):
        lj.adapter_shardings(specs, lora, mesh=mesh)
    lj.save(tmp_path / "ad.safetensors", lora)
    with pytest.raises(
        ValueError, match=r"lora_jax\.load: .* shardings must be a tree of NamedSharding shaped like the adapters"
    ):
        lj.load(tmp_path / "ad.safetensors", shardings={"x": NamedSharding(mesh, P())})
    with pytest.raises(ValueError, match=r"shardings must be a tree of NamedSharding"):  # specs need a mesh
        lj.load(tmp_path / "ad.safetensors", shardings=lj.adapter_shardings(param_specs(PARAMS, ROLES), lora))


def test_expert_parallel_moe_lora_equals_single_device():
    """Expert LoRA with the experts sharded over all 8 devices (expert parallelism): the adapters'
    expert axis follows the kernels', and the step's values and gradients equal one device's."""
    from moe import GptOssMoE

    block = GptOssMoE(experts=8, top_k=2, hidden=16, ffn=8)
    x = jax.random.normal(jax.random.key(4), (24, 16))
    params = block.init(jax.random.key(5), x)["params"]
    roles = lj.axis_roles(block, x)
    lora = jax.tree.map(lambda t: t + 0.05, lj.init(jax.random.key(6), params, lj.LoraConfig(
        rank=2, targets=r"(gate_up_proj|down_proj)"), roles=roles))  # fmt: skip
    apply = lj.wrap(block.apply, compute="factored")

    def loss(lora, params, x):
        return jax.numpy.sum(jax.numpy.sin(apply({"params": params, "lora": lora}, x)))

    want = jax.jit(jax.value_and_grad(loss))(lora, params, x)
    mesh = Mesh(np.array(jax.devices()), ("expert",))
    specs = jax.tree_util.tree_map_with_path(
        lambda path, w: P("expert") if path[-1].key in ("gate_up_proj", "down_proj") else P(), params
    )
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    lora_shardings = lj.adapter_shardings(shardings, lora)
    ad = lora_shardings["gate_up_proj"]
    assert (ad.a.spec, ad.b.spec) == (P("expert", None, None), P("expert", None, None))
    placed = jax.device_put(lora, lora_shardings), jax.device_put(params, shardings)
    got = jax.jit(jax.value_and_grad(loss), out_shardings=(None, lora_shardings))(*placed, x)
    assert got[1]["down_proj"].a.sharding.spec == P("expert", None, None)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in leaf_pairs(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
