"""hpd.train.allocator: glibc malloc thresholds set at CLI start, unless the user set MALLOC_*."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "from hpd.train import allocator; print(allocator.tune())"


def run(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tunes_glibc_unless_the_user_chose():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system")
    assert run({}) == "True"
    assert run({"MALLOC_TRIM_THRESHOLD_": "131072"}) == "False"
