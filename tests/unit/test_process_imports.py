"""The worker process loads none of the registry: its plumbing comes from aqimodels.process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after(statement: str) -> list[str]:
    """The aqimodels modules a fresh interpreter holds after running ``statement``."""
    code = f"{statement}; import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.startswith('aqimodels'))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_the_worker_entry_point_loads_no_registry_module() -> None:
    loaded = _loaded_after("import aqimodels.training.main")
    assert "aqimodels.training.main" in loaded  # the import happened
    assert "aqimodels.server.service" not in loaded
    assert "aqimodels.server.db" not in loaded
    assert [m for m in loaded if m.startswith("aqimodels.server")] == []


@pytest.mark.parametrize("module", ["auth", "deadlines", "health", "interceptors", "metrics", "settings", "shutdown"])
def test_the_shared_plumbing_depends_on_neither_the_registry_nor_the_worker(module: str) -> None:
    loaded = _loaded_after(f"import aqimodels.process.{module}")
    assert f"aqimodels.process.{module}" in loaded
    assert [m for m in loaded if m.startswith(("aqimodels.server", "aqimodels.training"))] == []
