"""benchmarks.compare_methods: its methods, the spread it prints, and its arguments."""

from __future__ import annotations

import sys

import pytest

from benchmarks import compare_methods as cm


def test_compare_methods_names_and_spread(monkeypatch):
    assert set(cm.METHODS) == {"sft", "fkl", "rkl", "jsd", "hpd"}
    assert cm.METHODS["jsd"][0] == "jsd (on-policy)"
    assert cm.spread([0.5]) == "0.500" and cm.spread([0.5, 0.7]).startswith("0.600 ± ")
    seen = {}
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--methods", "jsd", "hpd", "--seeds", "0"])
    monkeypatch.setattr(cm, "run_one", lambda *a, **k: seen.setdefault("called", a) and (_ for _ in ()).throw(
        SystemExit(0)))
    monkeypatch.setattr("hpd.backends.get_backend", lambda *a, **k: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit) as e:
        cm.main()  # the arguments parse; stops before loading a model
    assert e.value.code == 0
