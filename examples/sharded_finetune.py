"""LoRA fine-tuning on a device mesh: data parallel, FSDP and tensor parallel at once.

The GPT of `gpt.py` is sharded by simple rules (`param_specs`): FSDP splits each kernel's
input axis over `fsdp`; tensor parallelism splits attention heads and the MLP hidden layer
over `tensor`; the batch is split over `data` and `fsdp`. `lj.adapter_shardings` gives
each adapter its kernel's sharding (`a` follows the input axes, `b` the output axes), the
adapters are created already sharded by a jitted `lj.init`, and the train step is jitted
with those shardings, so nothing is gathered to one device. (The base here is freshly
initialised: this example is about the mechanics; `finetune.py` is about the result.)

On one CPU, simulate 8 devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_finetune.py --mesh data=2,fsdp=2,tensor=2

Across hosts, start the same command on every host after `jax.distributed.initialize()`
(see docs/sharding.md); the mesh then spans all hosts' devices.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data
from gpt import GPT, GPTConfig, next_token_loss

import lora_jax as lj

AXES = ("data", "fsdp", "tensor")
TARGETS = r"block_\d+/(attn/(query|key|value|out)|mlp/(fc|proj))/kernel"


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> ``{"data": 2, "fsdp": 2, "tensor": 2}`` (missing axes: 1)."""
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if name not in sizes or not size.isdigit() or int(size) < 1:
            raise ValueError(f"--mesh: {part!r} is not one of {AXES} '=' a positive size")
        sizes[name] = int(size)
    return sizes


def make_mesh(sizes: dict[str, int]) -> Mesh:
    n = math.prod(sizes.values())
    if n != jax.device_count():
        raise ValueError(f"--mesh needs {n} devices, {jax.device_count()} are visible "
                         "(on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")  # fmt: skip
    return Mesh(np.array(jax.devices()).reshape(tuple(sizes.values())), AXES)


def param_specs(params: dict, roles: dict, *, fsdp: bool = True, tensor: bool = True) -> dict:
    """PartitionSpecs for the GPT's params: FSDP on each kernel's first input axis, tensor
    parallelism on attention heads (q/k/v out, attention-out in) and the MLP hidden axis."""

    def spec(keys, leaf):
        path = "/".join(map(str, keys))
        kernel_roles = roles.get(path)
        if kernel_roles is None or leaf.ndim < 2:
            return P()
        axes = [None] * leaf.ndim
        if tensor:
            if path.endswith(("query/kernel", "key/kernel", "value/kernel", "mlp/fc/kernel")):
                axes[kernel_roles.index("out")] = "tensor"  # heads, or the MLP hidden units
            elif path.endswith(("attn/out/kernel", "mlp/proj/kernel")):
                axes[kernel_roles.index("in")] = "tensor"
        if fsdp:
            first_in = kernel_roles.index("in")
            if axes[first_in] is None:
                axes[first_in] = "fsdp"
        return P(*axes)

    return jax.tree_util.tree_map_with_path(lambda kp, x: spec([k.key for k in kp], x), params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2", help="axis sizes, e.g. data=2,fsdp=2,tensor=2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args(argv)
    try:
        mesh = make_mesh(parse_mesh(args.mesh))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    cfg = GPTConfig(vocab=256, max_len=64, features=64, heads=4, layers=2)
    model, batch = GPT(cfg), 16
    sample = jnp.zeros((batch, cfg.max_len), jnp.int32)
    roles = lj.axis_roles(model, sample)
    with jax.set_mesh(mesh):
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(
            jax.eval_shape(lambda: model.init(jax.random.key(0), sample)["params"]), roles))  # fmt: skip
        params = jax.jit(lambda k: model.init(k, sample)["params"], out_shardings=shardings)(jax.random.key(0))
        config = lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
        make = lambda k: lj.init(k, params, config, roles=roles)
        lora_shardings = lj.adapter_shardings(shardings, jax.eval_shape(make, jax.random.key(1)))
        lora = jax.jit(make, out_shardings=lora_shardings)(jax.random.key(1))
        batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
        step = train_step(model, optax.adam(3e-3), shardings, lora_shardings, batch_sharding)
        opt_state = optax.adam(3e-3).init(lora)
        tokens = data.batches(data.corpora(200_000)["code_train"], batch, cfg.max_len, seed=0)
        for i in range(1, args.steps + 1):
            lora, opt_state, loss = step(params, lora, opt_state, jax.device_put(next(tokens), batch_sharding))
            if i % 10 == 0 or i == 1:
                print(f"step {i:3d}  loss {float(loss):.3f}")
    kernel, q = params["block_0"]["attn"]["query"]["kernel"], lora["block_0"]["attn"]["query"]["kernel"]
    spec = lambda x: f"P{tuple(x.sharding.spec)}"
    print(f"mesh {dict(mesh.shape)}; block_0/attn/query/kernel {spec(kernel)} -> a {spec(q.a)}, b {spec(q.b)}")
    return 0


def train_step(model, tx, param_shardings, lora_shardings, batch_sharding):
    """The jitted LoRA step with every input and output sharding given."""
    apply = lj.wrap(model.apply)

    def step(params, lora, opt_state, tokens):
        loss, grads = jax.value_and_grad(
            lambda ad: next_token_loss(apply({"params": params, "lora": ad}, tokens), tokens)
        )(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return jax.jit(step, in_shardings=(param_shardings, lora_shardings, None, batch_sharding),
                   out_shardings=(lora_shardings, None, None))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
