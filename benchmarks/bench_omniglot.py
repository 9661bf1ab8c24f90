"""Omniglot conv4 (64 channels, 1x28x28, 5-way 1-shot, 15 query per class), S=1, inner lr 0.4.
T=32 on a GPU, T=8 on a CPU."""
import pytest

from conftest import DEVICE, providers

TASKS = 32 if DEVICE == "cuda" else 8


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("provider", [p for p in providers("omniglot") if p not in ("l2l", "higher")])
def test_omniglot(run_provider, provider, order):
    run_provider(provider, "omniglot", order == "first", tasks=TASKS)
