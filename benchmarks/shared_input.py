"""Does one down-projection GEMM for kernels that share an input (q/k/v) pay on this machine?

The LoRA branches of the query, key and value projections all start with ``x ⋅ a``. Instead of
three thin GEMMs ``x ⋅ a_q``, ``x ⋅ a_k``, ``x ⋅ a_v`` (and three input gradients
``g_u ⋅ aᵀ``, three weight gradients ``xᵀ ⋅ g_u``), one GEMM ``x ⋅ [a_q | a_k | a_v]`` reads
``x`` once. This times the branches alone (forward + backward, jitted), separate vs
concatenated, side by side.

    python benchmarks/shared_input.py   # about a minute on 2 CPU cores
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

import lora_jax as lj

TOKENS = 8 * 128  # the batch of train_step.py


def branches(fused: bool):
    def loss(x, a, b, g):  # a: (3, d, r), b: (3, r, d), g: (3, n, d): the three branch cotangents
        if fused:
            d, r = a.shape[1], a.shape[2]
            u = x @ jnp.transpose(a, (1, 0, 2)).reshape(d, 3 * r)  # one GEMM
            ys = [u[:, i * r : (i + 1) * r] @ b[i] for i in range(3)]
        else:  # what wrap computes today: lj.extend.lowrank per layer (its hand-written backward)
            ys = [lj.extend.lowrank(lj.extend.Einsum("ni,io->no", x), a[i], b[i], 1.0) for i in range(3)]
        return sum(jnp.sum(y * g[i]) for i, y in enumerate(ys))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; q/k/v LoRA branches of {TOKENS} tokens, "
          "forward + backward, median of 30 interleaved runs")  # fmt: skip
    print(f"{'width':>5s} {'rank':>4s} {'separate ms':>12s} {'one GEMM ms':>12s} {'ratio':>6s}")
    for width in (256, 1024):
        for rank in (8, 64):
            keys = jax.random.split(jax.random.key(width + rank), 4)
            args = (
                jax.random.normal(keys[0], (TOKENS, width)),
                jax.random.normal(keys[1], (3, width, rank)),
                jax.random.normal(keys[2], (3, rank, width)),
                jax.random.normal(keys[3], (3, TOKENS, width)),
            )
            fns = {"separate": branches(False), "fused": branches(True)}
            for fn in fns.values():
                jax.block_until_ready(fn(*args))
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(30):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*args))
                    times[name].append(time.perf_counter() - start)
            sep, fus = (statistics.median(times[k]) for k in ("separate", "fused"))
            print(f"{width:5d} {rank:4d} {sep * 1e3:12.3f} {fus * 1e3:12.3f} {fus / sep:6.3f}")


if __name__ == "__main__":
    main()
