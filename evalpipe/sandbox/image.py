"""The Docker image the `docker` sandbox runs: how to build it, find it and check that it is current.

Two ways to build, chosen automatically:
- `dockerfile`: `docker build` of `sandboxes/python/Dockerfile` (FROM python:3.11-slim). Needs the base
  image locally or a reachable registry.
- `offline`: `debootstrap --variant=minbase --include=python3 bookworm` from the Debian mirror that apt on
  this host uses, then `docker import` of that tree with the runner copied in. Needs root and debootstrap,
  but no registry: the only network traffic goes to the Debian mirror.

Either way the image carries the sha256 of the runner it was built with (label `evalpipe.runner.sha256`), so a
changed `sandboxes/runner.py` is noticed at start-up instead of running stale code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors

from evalpipe.errors import UserError
from evalpipe.paths import runner_script, sandboxes_dir

DEFAULT_IMAGE = "evalpipe-sandbox:py311"
"""The image the docker sandbox uses unless told otherwise."""
RUNNER_PATH = "/opt/evalpipe/runner.py"
"""Where the runner lives inside the image."""
WORK_ROOT = "/work"
"""The runner's work root inside the container (a tmpfs mounted by the sandbox)."""
RUNNER_LABEL = "evalpipe.runner.sha256"
BUILD_LABEL = "evalpipe.build"
DEBIAN_SUITE = "bookworm"
"""Debian 12 ships Python 3.11, the version evalpipe targets."""
FALLBACK_MIRROR = "http://deb.debian.org/debian"
BUILD_COMMAND = "evalpipe sandbox build"

Progress = Callable[[str], None]
BuildMethod = Literal["auto", "dockerfile", "offline"]

# The offline image drops what a program never needs; this also keeps the import small and fast.
_PRUNE = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)


def runner_sha256() -> str:
    """Hash of the runner that a current image must contain."""
    return hashlib.sha256(runner_script().read_bytes()).hexdigest()


@contextmanager
def docker_errors(action: str) -> Iterator[None]:
    """Turn Docker SDK and socket errors raised inside the block into one-line `UserError`s."""
    try:
        yield
    except docker.errors.ImageNotFound as error:
        raise UserError(
            f"{action}: image not found ({error.explanation}); build it with `{BUILD_COMMAND}`"
        ) from error
    except docker.errors.APIError as error:
        raise UserError(f"{action}: Docker refused: {error.explanation or error}") from error
    except (docker.errors.DockerException, OSError) as error:
        raise daemon_error(error) from error


def daemon_error(error: BaseException) -> UserError:
    """The one-line explanation of why the Docker daemon cannot be used."""
    text = str(error)
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if isinstance(error, PermissionError) or "Permission denied" in text or "PermissionError" in text:
        return UserError(
            f"permission denied on the Docker socket ({host}): run as root or add your user to the 'docker' "
            "group (`sudo usermod -aG docker $USER`, then log in again)"
        )
    if any(
        s in text for s in ("FileNotFoundError", "ConnectionRefused", "Connection refused", "No such file")
    ):
        return UserError(
            f"the Docker daemon is not running ({host}): start it with `sudo systemctl start docker` "
            "(or `sudo dockerd &` where there is no systemd)"
        )
    return UserError(f"cannot use Docker ({host}): {text.splitlines()[0] if text else type(error).__name__}")


def docker_client() -> docker.DockerClient:
    """A client for the daemon named by the environment (DOCKER_HOST) or the default socket."""
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, OSError) as error:
        raise daemon_error(error) from error
    return client


def image_id(name: str = DEFAULT_IMAGE, client: docker.DockerClient | None = None) -> str | None:
    """The id of image `name`, or None when there is no such image."""
    client = client or docker_client()
    with docker_errors(f"cannot inspect image {name}"):
        try:
            return str(client.images.get(name).id)
        except docker.errors.ImageNotFound:
            return None


def runner_tag(name: str = DEFAULT_IMAGE) -> str:
    """`name` with the runner's hash in its tag, e.g. `evalpipe-sandbox:py311-runner-0123456789ab`.

    `build_image` tags every image so as well, and `ensure_image` looks for that tag first: checkouts with
    different runners (branches, worktrees) then each find their own image instead of rebuilding the shared
    name back and forth.
    """
    suffix = f"-runner-{runner_sha256()[:12]}"
    if name.endswith(suffix):
        return name
    repository, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    return f"{repository}:{tag}{suffix}"


def ensure_image(name: str = DEFAULT_IMAGE, client: docker.DockerClient | None = None) -> str:
    """The id of image `name` (or of its `runner_tag`, when that exists and is current); a `UserError` naming
    the build command when it is missing or out of date."""
    client = client or docker_client()
    with docker_errors(f"cannot inspect image {name}"), contextlib.suppress(docker.errors.ImageNotFound):
        tagged = client.images.get(runner_tag(name))
        if (tagged.labels or {}).get(RUNNER_LABEL) == runner_sha256():
            return str(tagged.id)
    with docker_errors(f"cannot inspect image {name}"):
        try:
            image = client.images.get(name)
        except docker.errors.ImageNotFound:
            raise UserError(f"the sandbox image {name} is missing: build it with `{BUILD_COMMAND}`") from None
    labels = image.labels or {}
    if labels.get(RUNNER_LABEL) != runner_sha256():
        raise UserError(
            f"the sandbox image {name} was built from another version of sandboxes/runner.py: "
            f"rebuild it with `{BUILD_COMMAND}`"
        )
    return str(image.id)


def build_image(
    name: str = DEFAULT_IMAGE, *, progress: Progress | None = None, method: BuildMethod = "auto"
) -> str:
    """Build the sandbox image and return its id.

    `auto` uses the Dockerfile when its base image is present or can be pulled, and otherwise builds offline
    with debootstrap (root only). Every build ends with a smoke test: the runner must start in the image.
    """
    say = progress or (lambda _line: None)
    client = docker_client()
    previous = image_id(name, client)
    if method == "dockerfile" or (method == "auto" and _base_image_available(client, say)):
        new_id = _build_from_dockerfile(client, name, say)
    else:
        new_id = _build_offline(client, name, say)
    _smoke_test(client, name, say)
    if runner_tag(name) != name:
        repository, _, tag = runner_tag(name).rpartition(":")
        with docker_errors(f"cannot tag image {name}"):
            client.images.get(new_id).tag(repository, tag)
    if previous is not None and previous != new_id:
        # The old image lost its tag; drop it unless containers still use it (then Docker refuses: fine).
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(previous)
    return new_id


def _dockerfile() -> Path:
    return sandboxes_dir() / "python" / "Dockerfile"


def _base_image_available(client: docker.DockerClient, say: Progress) -> bool:
    """Whether the Dockerfile's base image is here or can be pulled now.

    Without a registry the daemon fails the pull at once (DNS or connection error), so this costs little.
    """
    match = re.search(r"^FROM\s+(\S+)", _dockerfile().read_text(), flags=re.MULTILINE)
    if match is None:
        raise UserError(f"{_dockerfile()} has no FROM line")
    base = match.group(1)
    try:
        client.images.get(base)
        return True
    except docker.errors.ImageNotFound:
        pass
    except docker.errors.DockerException as error:
        raise daemon_error(error) from error
    say(f"pulling {base} ...")
    repository, _, tag = base.partition(":")
    try:
        client.images.pull(repository, tag=tag or "latest")
    except docker.errors.DockerException as error:
        reason = str(getattr(error, "explanation", None) or error).splitlines()[0]
        say(f"no registry reachable ({reason}); building offline with debootstrap")
        return False
    return True


def _build_from_dockerfile(client: docker.DockerClient, name: str, say: Progress) -> str:
    started = time.monotonic()
    say(f"docker build {_dockerfile()} -> {name}")
    labels = {RUNNER_LABEL: runner_sha256(), BUILD_LABEL: "dockerfile"}
    with docker_errors("docker build failed"):
        # The context is sandboxes/ so that the image copies the one runner there is, not a copy of it.
        stream = client.api.build(
            path=str(sandboxes_dir()),
            dockerfile="python/Dockerfile",
            tag=name,
            labels=labels,
            rm=True,
            forcerm=True,
            decode=True,
        )
        for chunk in stream:
            if "error" in chunk:
                raise UserError(f"docker build failed: {str(chunk['error']).strip()}")
            line = str(chunk.get("stream", "")).strip()
            if line:
                say(line)
        built = str(client.images.get(name).id)
    say(f"built {name} ({built[:19]}) in {time.monotonic() - started:.1f} s")
    return built


def debian_mirror() -> str:
    """The Debian mirror for the offline build: $EVALPIPE_DEBIAN_MIRROR, else the one apt uses here.

    Hosts without internet often reach Debian only through a local mirror or proxy that apt is configured
    for, so reuse apt's own `bookworm` source rather than assuming deb.debian.org.
    """
    explicit = os.environ.get("EVALPIPE_DEBIAN_MIRROR")
    if explicit:
        return explicit
    for uri in _apt_sources(Path("/etc/apt")):
        return uri
    return FALLBACK_MIRROR


def _apt_sources(apt_dir: Path) -> Iterator[str]:
    """URIs of enabled `deb` sources that carry the `bookworm` suite (not -security or -updates)."""
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(parts.glob("*.list")) + sorted(parts.glob("*.sources"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":  # deb822: paragraphs of `Field: value`
            for paragraph in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in paragraph.splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not line.startswith((" ", "#")):
                        fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if (
                    "deb" in fields.get("types", "").split()
                    and DEBIAN_SUITE in fields.get("suites", "").split()
                ):
                    yield from fields.get("uris", "").split()
        else:  # one-line format: deb [options] URI suite components...
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == DEBIAN_SUITE:
                    yield words[1]


def _build_offline(client: docker.DockerClient, name: str, say: Progress) -> str:
    if os.geteuid() != 0:
        raise UserError(
            "no registry is reachable and the offline build (debootstrap) needs root: "
            f"run `sudo {BUILD_COMMAND}`"
        )
    if shutil.which("debootstrap") is None:
        raise UserError(
            "no registry is reachable and debootstrap is not installed: `apt-get install -y debootstrap`, "
            f"then `{BUILD_COMMAND}`"
        )
    mirror = debian_mirror()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="evalpipe-image-") as scratch:
        root = Path(scratch) / "root"
        # `python3` (not python3-minimal) brings libpython3.11-stdlib: json, resource, decimal, fractions,
        # statistics and ctypes, which the runner and HumanEval programs import.
        command = [
            "debootstrap", "--variant=minbase", "--include=python3", DEBIAN_SUITE, str(root), mirror,
        ]  # fmt: skip
        say(" ".join(command))
        _run_logged(command, say, "debootstrap failed")
        say(f"debootstrap done in {time.monotonic() - started:.1f} s")
        for part in _PRUNE:
            shutil.rmtree(root / part, ignore_errors=True)
        (root / "var/cache/apt").mkdir(parents=True, exist_ok=True)
        runner = root / RUNNER_PATH.lstrip("/")
        runner.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(runner_script(), runner)
        runner.chmod(0o644)
        # Docker copies a mount point's mode onto the tmpfs mounted there (its `mode=` option loses), so the
        # image decides: programs may not list the work root nor write /tmp, which outlives a job.
        (root / WORK_ROOT.lstrip("/")).mkdir(exist_ok=True)
        (root / WORK_ROOT.lstrip("/")).chmod(0o711)
        (root / "tmp").chmod(0o755)
        # Fail here, with the reason, rather than at the first job: the runner must import on this Python.
        _run_logged(
            ["chroot", str(root), "python3", "-I", "-S", "-c", _IMPORT_CHECK], say, "image check failed"
        )

        tarball = Path(scratch) / "rootfs.tar"
        # /dev, /proc and /sys are mounted by Docker at run time; their contents have no place in the image.
        _run_logged(
            ["tar", "--numeric-owner", "-C", str(root), "--exclude=./dev/*", "--exclude=./proc/*",
             "--exclude=./sys/*", "-cf", str(tarball), "."],
            say,
            "tar failed",
        )  # fmt: skip
        repository, _, tag = name.partition(":")
        changes = [
            f"CMD {_json_list(['python3', '-I', '-S', RUNNER_PATH, '--work-root', WORK_ROOT])}",
            f"WORKDIR {WORK_ROOT}",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            f"LABEL {RUNNER_LABEL}={runner_sha256()}",
            f"LABEL {BUILD_LABEL}=offline-debootstrap-{DEBIAN_SUITE}",
        ]
        say(f"docker import -> {name}")
        with docker_errors("docker import failed"):
            client.api.import_image_from_file(
                str(tarball), repository=repository, tag=tag or "latest", changes=changes
            )
            built = str(client.images.get(name).id)
    say(f"built {name} ({built[:19]}) offline in {time.monotonic() - started:.1f} s")
    return built


_IMPORT_CHECK = (
    "import ctypes, decimal, fractions, json, resource, statistics, hashlib, heapq, select, signal; "
    "import os; assert hasattr(os, 'pidfd_open')"
)


def _json_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def _run_logged(command: list[str], say: Progress, failure: str) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in completed.stdout.splitlines()[-5:]:
        say(line)
    if completed.returncode != 0:
        tail = (completed.stderr.strip() or completed.stdout.strip()).splitlines()[-3:]
        raise UserError(f"{failure} (exit {completed.returncode}): {' | '.join(tail)}")


def _smoke_test(client: docker.DockerClient, name: str, say: Progress) -> None:
    """Start the runner in the new image with stdin at EOF: it must print its ready line and exit 0."""
    with docker_errors("the new image does not run"):
        output: Any = client.containers.run(
            name, network_mode="none", remove=True, stdout=True, stderr=True, read_only=True,
            tmpfs={WORK_ROOT: "size=1m"},
        )  # fmt: skip
    text = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
    if '"ready": true' not in text:
        raise UserError(f"the new image {name} does not start the runner: {text.strip()[:300]}")
    say(f"smoke test passed: {text.strip().splitlines()[0]}")
