"""examples/few_shot_conv4.py: it meta-learns (query accuracy after adaptation rises above chance
on its synthetic tasks) and its --tune / --task-chunk / --first-order paths run."""
import json

import pytest

from conftest import load_example


def _example():
    return load_example("few_shot_conv4")


def _lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


SMALL = ["--tasks", "4", "--channels", "8", "--classes", "20", "--noise", "0.5", "--device", "cpu"]


def test_few_shot_conv4_learns(capsys):
    _example().main(SMALL + ["--iterations", "40", "--log-every", "10"])
    lines = _lines(capsys)
    assert [r["iteration"] for r in lines] == [10, 20, 30, 40]
    first, last = lines[0], lines[-1]
    assert last["query_loss"] < first["query_loss"]
    assert last["query_accuracy"] > 0.3  # 5-way: chance is 0.2


@pytest.mark.parametrize("extra", [["--tune"], ["--task-chunk", "2"], ["--first-order", "--steps", "2"],
                                   ["--recompute", "--checkpoint-steps", "--steps", "2"], ["--anil", "--steps", "3"],
                                   ["--maml-plus-plus", "--steps", "2", "--anneal", "2"],
                                   ["--reptile", "--steps", "3"]])
def test_few_shot_conv4_options(capsys, extra):
    _example().main(SMALL + ["--iterations", "2", "--log-every", "1"] + extra)
    lines = _lines(capsys)
    assert len(lines) == 2 and all(r["query_loss"] == r["query_loss"] for r in lines)  # not NaN


def test_few_shot_conv4_graphed_needs_cuda():
    with pytest.raises(SystemExit):
        _example().main(["--graphed", "--device", "cpu", "--iterations", "1"])
