"""Fixtures of the chart tests: one parametrised case per values file."""

from __future__ import annotations

from typing import Any

import pytest
from chartkit import CASES, render


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request) -> str:
    return request.param


@pytest.fixture
def docs(case: str) -> tuple[dict[str, Any], ...]:
    return render(CASES[case])
