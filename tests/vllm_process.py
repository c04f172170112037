"""A vLLM OpenAI-compatible server process on 127.0.0.1, for the tests' session fixture and the
benchmarks: started in a session of its own, ready when /health answers, stopped with its
whole process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, name: str, port: int, log: Path, *, max_model_len: int = 128, max_logprobs: int = 64,
          timeout: float = 900.0) -> subprocess.Popen:
    """The server on `model` (float32, eager, 1 GiB of KV cache), serving it as `name`; raises
    RuntimeError with the end of its log if it exits or is not up within `timeout` seconds
    (~35 s on a quiet 2-core machine, minutes on a loaded one)."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # its own processes
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
           name, "--dtype", "float32", "--max-model-len", str(max_model_len), "--max-logprobs", str(max_logprobs),
           "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            tail = "\n".join(Path(log).read_text().splitlines()[-20:])
            raise RuntimeError(f"the vLLM server did not start (exit status {proc.poll()}):\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1.0)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
