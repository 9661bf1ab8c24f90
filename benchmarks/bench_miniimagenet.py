"""mini-ImageNet conv4 (32 channels, 3x84x84, 5-way 5-shot, 15 query per class), T=32, S=5,
inner lr 0.01. GPU only (a 2-core CPU needs minutes per meta-iteration)."""
import pytest

from conftest import DEVICE, providers


@pytest.mark.skipif(DEVICE != "cuda", reason="mini-ImageNet conv4 is benchmarked on a GPU only")
@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("provider", [p for p in providers("miniimagenet") if p not in ("l2l", "higher")])
def test_miniimagenet(run_provider, provider, order):
    run_provider(provider, "miniimagenet", order == "first", tasks=32)
