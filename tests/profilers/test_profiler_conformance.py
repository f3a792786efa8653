"""Backend conformance (spdy.testing.backends): every check against every available backend
(unavailable ones skip)."""

from __future__ import annotations

import pytest

from spdy.testing.backends import CHECKS


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_backend_conformance(backend, check) -> None:
    check(backend)
