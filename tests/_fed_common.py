"""Shared pieces of the federated tests: a tiny backbone and a one-thread torch fixture."""

from __future__ import annotations

import pytest

#: A 2-block random ViT on 16 px images: federated tests build many clients, keep them cheap.
TINY = {"name": "tiny_vit", "img_size": 16, "tiny_patch": 4, "tiny_dim": 32, "tiny_depth": 2, "tiny_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # noqa: ARG001  (conftest fixture)
    """Clients train one after another on one thread (as the federated runner does by default)."""
    yield
