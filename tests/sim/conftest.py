"""Fixtures shared by the simulation modules."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _quiet_vllm() -> Iterator[None]:
    # vLLM logs every recovered load failure; thousands of them drown pytest -ra.
    log = logging.getLogger("vllm")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)
