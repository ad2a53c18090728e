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


@pytest.fixture
def etcd(tmp_path):
    """A real etcd server for this test (cluster tests), stopped afterwards."""
    from cluster_services import EtcdServer

    server = EtcdServer(tmp_path / "etcd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats(tmp_path):
    """A real NATS server for this test (cluster tests), stopped afterwards."""
    from cluster_services import NatsServer

    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()
