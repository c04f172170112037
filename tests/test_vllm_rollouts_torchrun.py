"""`torchrun --nproc-per-node 2 hpd distill --rollout-engine vllm` under FSDP (gloo, CPU): each
rank starts its own engine after the process group, loads the full weights gathered from the
shards before its rollouts, and generates its own rows. Each row's sampled rollout is keyed by
(seed, step, row), so 2 ranks x 8 rows train what 1 process x 16 rows trains (on the session's
engine, with the same engine arguments), up to float reordering: loss and gradient norm to
relative 1e-5, weights to 1e-5 absolute (tests/test_distributed_torch.py's tolerances)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from vllm_runs import Recorder, config, engine_flags, flags, max_diff, steps_of, torchrun, weights, write_data

import hpd
from hpd.train.rollout import Rollouts, Sampling
from hpd.train.rollout_vllm import VllmRollouts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)


def test_two_fsdp_ranks_with_an_engine_each_train_what_one_process_trains(vllm_student, tmp_path):
    data = write_data(tmp_path)
    two = config(tmp_path / "two", data, batch_size=8, parallel="fsdp", max_grad_norm=0.3, lr=3e-3)
    recipe = tmp_path / "schedule.yaml"
    recipe.write_text(json.dumps({"schedule": two["schedule"]}))
    result = torchrun(["distill", "--recipe", str(recipe), *flags(two), *engine_flags()])
    assert result.returncode == 0, result.stderr[-6000:]
    hook = Recorder(Rollouts(Sampling(max_new_tokens=32), VllmRollouts(vllm_student, owned=False)))
    hpd.distill(config(tmp_path / "one", data, batch_size=16, max_grad_norm=0.3, lr=3e-3), rollout=hook)

    a, b = steps_of(tmp_path / "one"), steps_of(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]  # every target is a rollout token (rollout/tokens: rank 0's own)
        np.testing.assert_allclose(y["loss"], x["loss"], rtol=1e-5)
        np.testing.assert_allclose(y["grad_norm"], x["grad_norm"], rtol=1e-5)
        assert y["rollout/engine"] == "vllm" and y["rollout/sync_s"] > 0
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
