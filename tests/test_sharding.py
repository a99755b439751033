"""Runs tests/sharded/ in a subprocess with 8 simulated CPU devices (JAX fixes its device
count when it starts, so these cannot run in this process)."""

import os
import subprocess
import sys

import jax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

pytestmark = pytest.mark.slow  # examples and real models: minutes in all

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharded_suite_on_8_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         os.path.join(HERE, "sharded")],
        capture_output=True, text=True, timeout=900, env=env, cwd=os.path.dirname(HERE),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_nnx_partitioning_annotations_give_adapter_specs_of_the_adapters_own_rank():
    """Kernels annotated with nnx.with_partitioning, one stacked by nnx.vmap: each adapter array
    gets a spec of its own rank (Tunix once applied a 3-D kernel spec to a 2-D adapter)."""
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tensor"))

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 6, kernel_init=init, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)
            self.head = nnx.Linear(6, 2, kernel_init=init, rngs=rngs)

    mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
    with jax.set_mesh(mesh):
        state = nnx.state(Model(nnx.Rngs(0)))
    specs = nnx.get_partition_spec(state)
    lora = lj.init(jax.random.key(0), state, lj.LoraConfig(rank=2), roles={"blocks/lin/kernel": ("stack", "in", "out")})
    shardings = lj.adapter_shardings(specs, lora)
    stacked, head = shardings["blocks"]["lin"]["kernel"], shardings["head"]["kernel"]
    assert (stacked.a, stacked.b) == (P(None, "fsdp", None), P(None, None, "tensor"))
    assert (head.a, head.b) == (P("fsdp", None), P(None, "tensor"))
    placed = jax.device_put(lora, lj.adapter_shardings(specs, lora, mesh=mesh))
    assert placed["blocks"]["lin"]["kernel"].a.sharding == NamedSharding(mesh, P(None, "fsdp", None))
