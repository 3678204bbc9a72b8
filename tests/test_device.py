"""Device resolution (napari_slpd.utils.device): one meaning of "auto", "cpu", "cuda[:N]" for every caller."""

from __future__ import annotations

import pytest
import torch

from napari_slpd.errors import SlpdError
from napari_slpd.utils.device import check_device_name, cuda_index, kmeans_device, rank_device, resolve_device


def test_names_and_mappings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    assert check_device_name("cuda:1") == "cuda:1" and check_device_name("auto") == "auto"
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(SlpdError, match="device must be one of"):
            check_device_name(bad)
    with pytest.raises(SlpdError, match="unknown device"):
        resolve_device("tpu-ish")
    assert cuda_index("cuda:3") == 3 and cuda_index("cuda") == 0 and cuda_index("auto") == 0
    assert [kmeans_device(d) for d in ("auto", "cuda:1", "cuda", "cpu")] == ["auto", "cuda", "cuda", "cpu"]
    assert rank_device("cpu", 1, 2) == "cpu" and rank_device("auto", 0, 1) == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only messages")
def test_cuda_without_a_gpu_says_so():
    for name, rank in (("cuda", None), ("cuda:1", None), ("cuda", 1)):
        with pytest.raises(SlpdError, match="CUDA is not available"):
            resolve_device(name, local_rank=rank)
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    assert rank_device("auto", 3, 4) == "auto"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ranks_pick_their_gpu():
    n = torch.cuda.device_count()
    assert resolve_device("auto", local_rank=0) == torch.device("cuda:0")
    assert resolve_device("cuda", local_rank=n - 1) == torch.device(f"cuda:{n - 1}")
    assert rank_device("auto", n, 2) == f"cuda:{n % n}"
    assert resolve_device("auto") == torch.device("cuda")
