"""examples/maml_sine.py: sine regression in learn2learn's style with fastmeta.MAML / MetaSGD meta-learns (the
held-out query loss after adaptation falls, and ends below the loss before adaptation)."""
import pytest
import torch

import fastmeta
from conftest import load_example


SMALL = ["--tasks", "8", "--iterations", "80", "--log-every", "20", "--eval-tasks", "20", "--device", "cpu"]


@pytest.mark.parametrize("extra", [["--outer-lr", "0.005"], ["--outer-lr", "0.005", "--first-order"],
                                   ["--outer-lr", "0.001", "--metasgd"]])
def test_maml_sine_learns(extra, capsys):
    maml, log = load_example("maml_sine").main(SMALL + extra)
    assert [r["iteration"] for r in log] == [20, 40, 60, 80]
    assert capsys.readouterr().out.count("eval_after_adapt") == 4  # one JSON line a report
    first, last = log[0], log[-1]
    assert last["eval_after_adapt"] < 0.85 * first["eval_after_adapt"], log
    assert last["eval_after_adapt"] < 0.85 * last["eval_before_adapt"], log
    if "--metasgd" in extra:  # the learned rates moved from their initial value
        assert isinstance(maml, fastmeta.MetaSGD)
        assert max(float((r.detach() - 0.01).abs().max()) for r in maml.lrs) > 1e-4
        assert all(torch.isfinite(r).all() for r in maml.lrs)
