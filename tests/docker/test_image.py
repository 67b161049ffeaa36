"""Image look-up and the one-line errors for a missing daemon or image; apt mirror discovery."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from evalpipe.errors import UserError
from evalpipe.sandbox.image import _apt_sources, daemon_error, docker_client, ensure_image, image_id


def test_daemon_not_running_says_how_to_start_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/missing.sock")
    with pytest.raises(UserError, match=r"not running.*start it") as raised:
        docker_client()
    assert "\n" not in str(raised.value)


def test_missing_image_names_the_build_command(client: docker.DockerClient) -> None:
    with pytest.raises(UserError, match="missing: build it with `evalpipe sandbox build`"):
        ensure_image("evalpipe-sandbox:no-such-tag", client)
    assert image_id("evalpipe-sandbox:no-such-tag", client) is None


@pytest.fixture
def stale_image(client: docker.DockerClient) -> Iterator[str]:
    """A tiny image labelled with another runner's hash."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        archive.addfile(tarfile.TarInfo("empty"), io.BytesIO(b""))
    name = "evalpipe-sandbox:test-stale"
    client.api.import_image_from_data(
        data.getvalue(), repository="evalpipe-sandbox", tag="test-stale",
        changes=[f"LABEL evalpipe.runner.sha256={'0' * 64}"],
    )  # fmt: skip
    yield name
    client.images.remove(name, force=True)


def test_stale_image_is_refused(client: docker.DockerClient, stale_image: str) -> None:
    with pytest.raises(UserError, match=r"another version of sandboxes/runner\.py: rebuild"):
        ensure_image(stale_image, client)


def test_apt_sources_give_the_bookworm_mirror(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# deb http://commented/debian bookworm main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    (tmp_path / "sources.list.d" / "other.list").write_text(
        "deb [arch=amd64 signed-by=/k.gpg] http://local.example/debian bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "off.list.disabled").write_text(
        "deb http://disabled/debian bookworm main\n"
    )
    assert list(_apt_sources(tmp_path)) == ["http://local.example/debian", "http://mirror.example/debian"]


def test_permission_denied_on_the_socket_says_what_to_do() -> None:
    # What docker.from_env() raises when the socket exists but is not ours.
    error = docker.errors.DockerException(
        "Error while fetching server API version: "
        "('Connection aborted.', PermissionError(13, 'Permission denied'))"
    )
    message = str(daemon_error(error))
    assert message.startswith("permission denied on the Docker socket") and "docker' group" in message
