"""Docker sandbox tests: they need a reachable daemon and the sandbox image.

Without a daemon they skip with the reason. A missing or out-of-date image is built once per session
(offline with debootstrap when no registry is reachable: root only, ~1 min) unless EVALPIPE_NO_IMAGE_BUILD=1.
Set EVALPIPE_REQUIRE_DOCKER=1 (CI) to turn every such skip into a failure, so the suite cannot pass without
having run them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import NoReturn

import docker
import pytest

from evalpipe.errors import UserError
from evalpipe.sandbox.image import DEFAULT_IMAGE, build_image, docker_client, ensure_image


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("EVALPIPE_REQUIRE_DOCKER") == "1":
        pytest.fail(f"EVALPIPE_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/docker/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session")
def client() -> Iterator[docker.DockerClient]:
    """A client for a reachable daemon, or a skip that says why there is none."""
    try:
        found = docker_client()
    except UserError as error:
        _unavailable(f"no Docker daemon: {error}")
    yield found
    found.close()


@pytest.fixture(scope="session")
def image(client: docker.DockerClient) -> str:
    """The sandbox image's id, built once for the session when it is missing or stale."""
    try:
        return ensure_image(DEFAULT_IMAGE, client)
    except UserError as missing:
        if os.environ.get("EVALPIPE_NO_IMAGE_BUILD") == "1":
            _unavailable(str(missing))
        print(f"\n{missing}; building it now", file=sys.stderr)
    try:
        return build_image(DEFAULT_IMAGE, progress=lambda line: print(line, file=sys.stderr))
    except UserError as error:
        _unavailable(f"cannot build the sandbox image: {error}")
