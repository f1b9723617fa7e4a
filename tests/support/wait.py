"""Waiting for something to happen, never for time to pass."""

import time
from collections.abc import Callable
from typing import Any

import pytest


def wait_until(
    predicate: Callable[[], Any], timeout_s: float = 60, what: str = "", every_s: float = 0.05
) -> Any:
    """Poll every `every_s` until predicate() is truthy and return its value; fail (not hang)
    after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(every_s)
