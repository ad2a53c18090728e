"""Fixtures of the end-to-end suite: servers started per test or per module, always stopped."""

import pytest
from umclient import ServerFactory


@pytest.fixture
def start_server(tmp_path):
    """`start_server(plugin, *flags, wait=..., env=...)` -> a running Server, stopped afterwards."""
    factory = ServerFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory):
    """Like `start_server`, but the servers live for the whole test module."""
    factory = ServerFactory(tmp_path_factory.mktemp("servers"))
    yield factory
    factory.close()
