"""A Prefect test harness (temporary SQLite server) shared by the flow tests of a session."""

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Also isolates persisted task results: cached results of an earlier session would
    point at that session's deleted temporary folders."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(tmp_path_factory.mktemp("prefect-results"))}):
        with prefect_test_harness(server_startup_timeout=120):
            yield
