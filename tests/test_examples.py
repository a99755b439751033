"""The smaller examples run as documented (finetune.py has its own smoke test)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # examples and real models: minutes in all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT_DEVICES = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def _run(script, *args, env=None):
    cmd = [sys.executable, os.path.join(ROOT, "examples", script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_seed_example_runs():
    out = _run("seed_lora_linear.py").stdout
    assert "output shape (3, 4); fresh adapter changes nothing: True" in out
    assert "base parameters bit-identical after training: True" in out
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]
    assert losses[-1] < 0.01 * losses[0]


@pytest.mark.interop
def test_peft_interop_example_runs():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    out = _run("peft_interop.py").stdout
    diffs = [float(line.split("= ")[1].split()[0]) for line in out.splitlines() if "max |PyTorch - JAX|" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-4


def test_sharded_example_runs_on_8_simulated_devices():
    out = _run("sharded_finetune.py", "--steps", "3", env=EIGHT_DEVICES).stdout
    assert "-> a P('fsdp', None), b P(None, 'tensor', None)" in out
    bad = _run("sharded_finetune.py", "--mesh", "data=3", env=EIGHT_DEVICES)
    assert bad.returncode == 2 and "--mesh needs 3 devices, 8 are visible" in bad.stderr


def test_many_adapters_example_runs():
    proc = _run("many_adapters.py", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["upper"], ["rot13"], ["reverse"])]
    assert [r[0] for r in rows] == ["upper", "rot13", "reverse"]
    assert "one mixed batch of 288 rows" in proc.stdout


def test_moe_finetune_example_runs(tmp_path):
    """The MoE example trains expert LoRA and full fine-tuning and writes the adapter, one
    adapter per expert, also as a PEFT directory with target_parameters."""
    proc = _run("moe_finetune.py", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "expert LoRA (rank 8)" in proc.stdout and "full fine-tuning" in proc.stdout
    import json

    import jax
    import numpy as np

    import lora_jax as lj

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")
    )
    saved = lj.load(tmp_path / "adapter.safetensors")
    assert saved["block_0_moe"]["gate_up_proj"].roles == ("stack", "in", "out")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite([metrics["held_out_loss"][k] for k in ("base", "lora", "full")]).all()
    assert metrics["trainable_params"] == sum(x.size for x in jax.tree.leaves(saved))
