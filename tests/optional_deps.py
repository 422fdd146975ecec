"""The optional extras in tests: skipped where not installed, required where CI installs them.

`.[torch]` (torch, safetensors) is an extra, not a dependency: a user who installed only
`.[test]` gets those tests skipped with the install command as the reason. CI installs the
extra and sets REQUIRE_EXTRAS_ENV=1 (.ci/run), so there a missing package fails the tests
instead of skipping them.
"""

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_EXTRAS_ENV = "SIMCLR_TESTS_REQUIRE_EXTRAS"


def import_or_skip(name: str, extra: str) -> ModuleType:
    """Imports `name` (of the setup.py extra `extra`), or skips the calling test module."""
    if os.environ.get(REQUIRE_EXTRAS_ENV) == "1":
        return importlib.import_module(name)
    return pytest.importorskip(
        name,
        reason=f"needs {name}: pip install -e '.[{extra}]' (required where "
        f"{REQUIRE_EXTRAS_ENV}=1, as in CI)",
    )
