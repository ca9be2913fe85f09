"""Fixtures shared by the end-to-end modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import RedisServer, free_port


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this module's own on a free loopback port."""
    server = RedisServer(port=free_port(), workdir=str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scratch folder for engine process specs and hook files."""
    return Path(tmp_path_factory.mktemp("engines"))
