"""Shared test set-up: offline hub, two CPU threads, small fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
if "TRITON_INTERPRET" not in os.environ:
    # Without a GPU, Triton kernels run in the interpreter on CPU tensors. It must be set before
    # anything imports triton; on CUDA machines the kernels compile for the GPU instead.
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import pytest  # noqa: E402
import torch  # noqa: E402

import adaptsim.cl  # noqa: E402,F401  (torchvision compat before anything imports it)

torch.set_num_threads(2)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")
    config.addinivalue_line("markers", "slow: starts processes or trains for several seconds")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny models and clients trained one after another only lose time to thread synchronisation,
    and two threads per process oversubscribe the 2-core machine. Restores the count after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_stream():
    """sklearn digits, class-incremental B4 Inc3: 3 experiences."""
    from adaptsim.cl.data import DatasetConfig
    from adaptsim.cl.scenarios import ClassIncrementalArgs, build_stream

    return build_stream("class_incremental", ClassIncrementalArgs(
        dataset=DatasetConfig(name="digits"), initial_increment=4, increment=3))


@pytest.fixture(scope="session")
def tiny_backbone_cfg():
    from adaptsim.cl.backbones import BackboneConfig

    return BackboneConfig(name="tiny_vit", img_size=28, tiny_patch=7)


@pytest.fixture()
def tiny_backbone(tiny_backbone_cfg):
    from adaptsim.cl.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone(tiny_backbone_cfg).eval()
