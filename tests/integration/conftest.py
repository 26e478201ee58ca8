"""Stand-ins shared by the AWS integration tests: the local SageMaker runtime and a moto server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer
from support.sagemaker_endpoint import InvokeEndpointServer, running_endpoint


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InvokeEndpointServer]:
    """The demo model packaged by package-model, behind the toolkit, as strict as SageMaker Serverless."""
    with running_endpoint(tmp_path_factory.mktemp("endpoint")) as server:
        yield server


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
