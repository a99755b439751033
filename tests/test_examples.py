import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_seed_example_runs():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "seed_lora_linear.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "output shape (3, 4); fresh adapter changes nothing: True" in out
    assert "base parameters bit-identical after training: True" in out
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]
    assert losses[-1] < 0.01 * losses[0]


def test_peft_interop_example_runs():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "peft_interop.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    diffs = [float(line.split("= ")[1].split()[0]) for line in out.splitlines() if "max |PyTorch - JAX|" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-4


def test_sharded_example_runs_on_8_simulated_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "sharded_finetune.py"), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=env,
    ).stdout
    assert "-> a P('fsdp', None), b P(None, 'tensor', None)" in out
    bad = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "sharded_finetune.py"), "--mesh", "data=3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert bad.returncode == 2 and "--mesh needs 3 devices, 8 are visible" in bad.stderr
