"""Session-wide pytest hooks: the heartbeat of long tests (see tests/helpers/heartbeat.py)."""

from tests.helpers.heartbeat import pytest_runtest_logfinish, pytest_runtest_logstart

__all__ = ["pytest_runtest_logfinish", "pytest_runtest_logstart"]
