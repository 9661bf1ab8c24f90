"""Sine regression MLP 1-40-40-1 (Finn et al. 2017): K=Q=10, S=5, inner lr 0.01."""
import pytest

from conftest import DEVICE, providers


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("provider", providers("sine"))
def test_sine_T25(run_provider, provider, order):
    run_provider(provider, "sine", order == "first", tasks=25)


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("provider", ["fastmeta", "vmap"] + (["compile"] if DEVICE == "cuda" else []))
def test_sine_T1000(run_provider, provider, order):
    run_provider(provider, "sine", order == "first", tasks=1000)
