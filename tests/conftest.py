"""Shared fixtures and the suite-wide rules: offline, pinned threads, no network, slow/gpu marks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import socket  # noqa: E402

import pytest  # noqa: E402

_LOOPBACK = ("127.", "::1", "localhost")


def _guard_connect(orig):
    def connect(self, address, *args, **kwargs):
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and not str(host).startswith(_LOOPBACK):
            raise RuntimeError(f"test tried to open a non-loopback connection to {address!r}")
        return orig(self, address, *args, **kwargs)

    return connect


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    """Fail any test that opens a non-loopback socket: 'no network' is itself tested."""
    orig = socket.socket.connect
    socket.socket.connect = _guard_connect(orig)  # type: ignore[method-assign]
    yield
    socket.socket.connect = orig  # type: ignore[method-assign]


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
