"""Run a check on several simulated CPU devices.

XLA fixes the number of host devices when JAX starts, so a test that needs a mesh of ``n`` devices
runs its code in a fresh interpreter with ``--xla_force_host_platform_device_count=n``.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_on_devices(code: str, n: int = 8, timeout: float = 300) -> str:
    """Run ``code`` in a subprocess seeing ``n`` CPU devices; assert it exits 0 and prints "ok".

    Returns its standard output.
    """
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout.split(), out.stdout[-2000:]
    return out.stdout
