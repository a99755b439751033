"""Runs tests/sharded/ in a subprocess with 8 simulated CPU devices (JAX fixes its device
count when it starts, so these cannot run in this process)."""

import os
import subprocess
import sys

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
