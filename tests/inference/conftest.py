"""The trained run the server tests share: one, trained once a session, since every one of them
only reads it (serve, the fuzzer, the page)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.inference.serving import train_run


@pytest.fixture(scope="session")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("served"))
