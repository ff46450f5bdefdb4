"""What a test needs from the machine, and what happens without it: skipped here, failed in CI.

On a developer's machine a test that needs a tool cloudtrain does not install itself (an
OpenSSH server, a Python 3.7, root for a tmpfs) is skipped, saying what to install. Under
CI (``CI`` set, as ``.ci/run`` sets it) the same test fails instead: CI installs or finds
all of them, and a green run must not hide a whole class of tests that never ran.
"""

from __future__ import annotations

import functools
import os
from typing import NoReturn

import pytest

from cloudtrain.cloud import simimage


def unavailable(reason: str) -> NoReturn:
    """The test cannot run here: a skip, or, under CI, a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run this test; .ci/run installs what it needs)")
    pytest.skip(reason)


@functools.lru_cache(maxsize=1)
def _find_python37() -> str | None:
    return simimage.find_python37()  # runs each candidate: once per session is enough


def python37() -> str:
    """A working Python 3.7 (the agent on the Theano image's Python), or unavailable."""
    found = _find_python37()
    if found is None:
        unavailable(f"no Python 3.7: {simimage.INSTALL_PYTHON37}")
    return found
