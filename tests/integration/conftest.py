"""Stacks shared by several integration modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def auth_stack(mlflow_stack_factory):
    """A stack of the session's backend with MLflow's basic auth on: every port of it needs a credential."""
    with mlflow_stack_factory(auth=True) as stack:
        yield stack
