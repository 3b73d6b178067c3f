"""The controller image, built from the Dockerfile and run, with no Docker engine or registry.

Debian's `buildah` builds the Dockerfile (`--isolation chroot`, `--format docker` so the
HEALTHCHECK is kept) against a base image made here with `debootstrap`: Debian's python3 plus
this machine's CA bundle and pip configuration, tagged as the Dockerfile's base. The base is
cached in a storage of its own (not the machine's image store: the fake `python:*` tag must
not shadow the real one for anybody else), keyed by everything that goes into it, so only the
first run pays for debootstrap (~1.5 min); later runs take about a minute.

The container then runs its own ENTRYPOINT + CMD as the image's non-root user, answers its
HEALTHCHECK command, decides for a client on the host, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lrpilot.client import Client
from lrpilot.controller.server import parse_ready_line

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CACHE = Path(os.environ.get("LRPILOT_IMAGE_CACHE", "/var/tmp/lrpilot-image-test"))
IMAGE = f"localhost/lrpilot-test:{os.getpid()}"  # test runs side by side do not collide
#: The files that carry this machine's trust roots and package index settings into the image.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PIP_CONFIG = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf")]
PACKAGES = ["python3", "python3-venv", "python-is-python3"]
PRINT_VERSION = "import sys; print('%d.%d' % sys.version_info[:2])"
#: Bump when the recipe below changes: the cached base is rebuilt.
RECIPE = "1"

pytestmark = pytest.mark.timeout(600)


#: buildah on the test's own storage.
BUILDAH = ["buildah", "--root", str(CACHE / "root"), "--runroot", str(CACHE / "run")]


def buildah(*args: str, timeout: float = 300, check: bool = True) -> str:
    """Run buildah on the test's own storage; returns stdout."""
    argv = [*BUILDAH, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def in_container(ctr: str, *argv: str) -> list[str]:
    """The command line that runs `argv` in working container `ctr`, as the image's user."""
    return [*BUILDAH, "run", "--isolation", "chroot", ctr, "--", *argv]


def _reachable(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            reply.read(1)
        return None
    except OSError as exc:
        return f"{url}: {exc}"


def debian_mirror() -> tuple[str, str]:
    """The Debian mirror and suite this machine's apt uses (deb822 or one-line sources)."""
    suite = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            suite = line.split("=", 1)[1].strip('"')
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for uri in re.findall(r"^URIs:\s*(\S+)", path.read_text(), re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/"), suite
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", listing.read_text(), re.M):
            if m.group(1).rstrip("/").endswith("/debian"):
                return m.group(1).rstrip("/"), suite or m.group(2)
    return "http://deb.debian.org/debian", suite or "bookworm"


def pip_index() -> str:
    """The package index pip uses here (global.index-url, else PyPI)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    url = done.stdout.strip() if done.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def why_not() -> str | None:
    """Why buildah cannot build and run the image here, or None."""
    if os.geteuid() != 0:
        return "building and running the image with buildah (chroot isolation) needs root here"
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} missing: apt-get install -y buildah debootstrap"
    CACHE.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        [*BUILDAH, "images"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode != 0:
        return f"buildah cannot use its storage here: {probe.stderr.strip()[-300:]}"
    mirror, suite = debian_mirror()
    for url in (f"{mirror}/dists/{suite}/Release", f"{pip_index()}/setuptools/"):
        problem = _reachable(url)
        if problem:
            return f"no network to the package mirror the image needs ({problem})"
    return None


def base_images() -> list[str]:
    """The Dockerfile's external base images (FROM lines that name no earlier stage)."""
    stages: set[str] = set()
    bases = []
    for m in re.finditer(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", DOCKERFILE.read_text(), re.M | re.I):
        if m.group(1) not in stages and m.group(1) not in bases:
            bases.append(m.group(1))
        if m.group(2):
            stages.add(m.group(2))
    return bases


def qualified(name: str) -> str:
    """docker.io/library/python:3.11-slim for python:3.11-slim, as a builder resolves it."""
    first = name.split("/", 1)[0]
    if "/" not in name:
        return f"docker.io/library/{name}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{name}"
    return name


def make_base() -> str:
    """The debootstrap base image, built once per recipe, CA bundle, pip configuration."""
    mirror, suite = debian_mirror()
    key = hashlib.sha256()
    for part in (RECIPE, mirror, suite, *PACKAGES):
        key.update(part.encode() + b"\0")
    for path in [CA_BUNDLE, *PIP_CONFIG, *sorted(Path("/etc/xdg/pip").glob("*.txt"))]:
        key.update(str(path).encode() + b"\0" + (path.read_bytes() if path.exists() else b""))
    name = f"localhost/lrpilot-base:{suite}-{key.hexdigest()[:12]}"
    if buildah("images", "-q", name, check=False).strip():
        return name
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        done = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                suite,
                str(rootfs),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=480,
            check=False,
        )
        assert done.returncode == 0, f"debootstrap failed:\n{done.stdout[-2000:]}{done.stderr}"
        for path in [CA_BUNDLE, *PIP_CONFIG, *Path("/etc/xdg/pip").glob("*")]:
            if path.is_file():
                target = rootfs / path.relative_to("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        ctr = buildah("from", "scratch").strip()
        try:
            mount = buildah("mount", ctr).strip()
            subprocess.run(["cp", "-a", f"{rootfs}/.", mount], check=True, timeout=300)
            buildah("umount", ctr)
            buildah(
                "config",
                "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env", "LANG=C.UTF-8",
                "--cmd", "python3",
                "--label", f"lrpilot.test.base=debootstrap {suite}",
                ctr,
            )  # fmt: skip
            buildah("commit", "-q", ctr, name)
        finally:
            buildah("rm", ctr, check=False)
    return name


@pytest.fixture(scope="module")
def image() -> Iterator[dict[str, Any]]:
    """The image built from the Dockerfile; yields its Docker config (entrypoint, healthcheck)."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    base = make_base()
    for name in base_images():
        tag = name.split(":", 1)[1] if ":" in name else ""
        version = re.match(r"\d+\.\d+", tag)
        if name.split(":")[0].endswith("python") and version:
            ctr = buildah("from", "--pull=never", base).strip()
            try:
                have = subprocess.run(
                    in_container(ctr, "python3", "-c", PRINT_VERSION),
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=True,
                ).stdout.strip()
            finally:
                buildah("rm", ctr, check=False)
            assert have == version.group(0), (
                f"the Dockerfile builds on {name}; Debian {debian_mirror()[1]} has python {have}"
            )  # fmt: skip
        buildah("tag", base, qualified(name))
    buildah(
        "build", "--isolation", "chroot", "--format", "docker", "--pull=never",
        "-t", IMAGE, "-f", str(DOCKERFILE), str(ROOT), timeout=480,
    )  # fmt: skip
    config = json.loads(buildah("inspect", "--type", "image", IMAGE))["Docker"]["config"]
    try:
        yield config
    finally:
        buildah("rmi", IMAGE, check=False)


def test_the_image_keeps_its_healthcheck_user_and_volume(image: dict[str, Any]) -> None:
    assert image["Healthcheck"]["Test"] == ["CMD", "lrpilot", "status"]
    assert image["User"] == "10001:10001"
    assert image["Entrypoint"] == ["lrpilot", "serve"]
    assert "/var/lib/lrpilot" in image["Volumes"]
    assert "LRPILOT_ADMIN=ipc:///var/lib/lrpilot/admin.sock" in image["Env"]


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (ours: started by the buildah run this test started)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def _server_pid(runner: int) -> int:
    for pid in _descendants(runner):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"python") and b"serve" in argv:
            return pid
    raise AssertionError(f"no lrpilot serve process under buildah run (pid {runner})")


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def _ready_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no ready line within {timeout} s")
    return proc.stdout.readline()


def test_the_container_serves_a_host_client_and_answers_its_healthcheck(
    image: dict[str, Any],
) -> None:
    ctr = buildah("from", "--pull=never", IMAGE).strip()
    # The image's own ENTRYPOINT + CMD as its own user; loopback and free ports instead of the
    # fixed 5555/9477, which other programs on this host may hold (chroot isolation shares the
    # host's network, as `docker run --network host` would).
    argv = [*image["Entrypoint"], *image["Cmd"], "--bind", "tcp://127.0.0.1:0",
            "--metrics-host", "127.0.0.1", "--metrics-port", "0"]  # fmt: skip
    runner = subprocess.Popen(
        in_container(ctr, *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    client = None
    try:
        ready = parse_ready_line(_ready_line(runner, 60))
        assert ready is not None, runner.poll()
        assert ready["admin"] == "ipc:///var/lib/lrpilot/admin.sock"
        server = _server_pid(runner.pid)
        assert _uid(server) == 10001  # the image's non-root user, not root

        # A client on the host: the default policy (Keras' ReduceLROnPlateau, patience 10)
        # cuts 0.1 to 0.01 after ten epochs without improvement.
        client = Client(ready["bind"], job="image-job", initial_lr=0.1, timeout=5.0)
        lrs = [client.report(epoch=e, metrics={"val_loss": 1.0}) for e in range(11)]
        assert lrs[:10] == [pytest.approx(0.1)] * 10 and lrs[10] == pytest.approx(0.01)
        with urllib.request.urlopen(ready["metrics"], timeout=10) as reply:
            scrape = reply.read().decode()
        found = re.search(
            r'^lrpilot_learning_rate\{training_job="image-job"\} (\S+)$', scrape, re.M
        )
        assert found and float(found.group(1)) == pytest.approx(0.01), scrape

        # The HEALTHCHECK's command, run in the container as its user, reaches the loop.
        test = image["Healthcheck"]["Test"]
        assert test[0] == "CMD"
        health = subprocess.run(
            in_container(ctr, *test[1:]), capture_output=True, text=True, timeout=60
        )
        assert health.returncode == 0, health.stderr
        assert "image-job" in health.stdout
        owner = subprocess.run(
            in_container(ctr, "stat", "-c", "%u", "/var/lib/lrpilot/state.db"),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert owner.strip() == "10001"  # the state the controller wrote is its user's

        os.kill(server, signal.SIGTERM)  # what `docker stop` sends to the entrypoint
        assert runner.wait(30) == 0, runner.stderr.read() if runner.stderr else ""
        # With the controller gone, the same health check fails: it does check something.
        health = subprocess.run(
            in_container(ctr, *test[1:]), capture_output=True, text=True, timeout=60
        )
        assert health.returncode != 0
    finally:
        if client is not None:
            client.close()
        if runner.poll() is None:
            runner.kill()  # buildah run, started above; it takes its child with it
            runner.wait(30)
        for stream in (runner.stdout, runner.stderr):
            if stream is not None:
                stream.close()
        buildah("rm", ctr, check=False)
