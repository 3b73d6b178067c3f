"""Where a client gets what it was not given: endpoint, job, rank/world and CURVE keys.

Everything here reads an `environ` mapping (default `os.environ`) so tests pass their own.
The sources, first match wins:

- endpoint: `LRPILOT_ENDPOINT`, else `tcp://127.0.0.1:5555`; a comma-separated list names
  several controllers (`tcp://a:5555,tcp://b:5555`): the client uses the first that
  answers and fails over to the next.
- job: `LRPILOT_JOB`.
- rank and world: `TF_CONFIG` (chief and workers count; the chief is rank 0),
  `RANK`/`WORLD_SIZE` (torchrun), `OMPI_COMM_WORLD_RANK`/`OMPI_COMM_WORLD_SIZE`
  (Horovod / MPI), `SLURM_PROCID`/`SLURM_NTASKS`, else a single process (0, 1).
- CURVE: `LRPILOT_CURVE_SERVER_KEY` (the controller's public certificate) and
  `LRPILOT_CURVE_SECRET_KEY` (this client's secret certificate), both files as written by
  `lrpilot keygen` (`zmq.auth` format).

Example:

    from lrpilot.client.env import resolve_rank_world
    rank, world = resolve_rank_world()   # (1, 4) on torchrun's second of four processes
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError
from .protocol import check_name

__all__ = [
    "DEFAULT_ENDPOINT",
    "CurveKeys",
    "curve_keys",
    "default_endpoint",
    "endpoint_list",
    "resolve_job",
    "resolve_rank_world",
]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"

# (rank variable, world variable) pairs after TF_CONFIG, in order of precedence.
_RANK_WORLD_VARS = (
    ("RANK", "WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS"),
)


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def default_endpoint(environ: Mapping[str, str] | None = None) -> str:
    """The controller's endpoint: `LRPILOT_ENDPOINT`, else `tcp://127.0.0.1:5555`."""
    return _env(environ).get("LRPILOT_ENDPOINT") or DEFAULT_ENDPOINT


def endpoint_list(endpoint: str | Sequence[str] | None = None) -> list[str]:
    """The controllers to try, in order: `endpoint` (a comma-separated string or a list),
    else `LRPILOT_ENDPOINT`, else `tcp://127.0.0.1:5555`. Duplicates are left out.

    Raises:
        ValueError: an empty list, or an endpoint without a scheme (suggesting `tcp://`).

    Example:

        endpoint_list("tcp://a:5555, tcp://b:5555")   # ['tcp://a:5555', 'tcp://b:5555']
    """
    raw = endpoint if endpoint is not None and endpoint != "" else default_endpoint()
    parts = raw.split(",") if isinstance(raw, str) else list(raw)
    found: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"an endpoint must be a string, got {type(part).__name__}")
        name = part.strip()
        if not name:
            continue
        if "://" not in name:
            raise ValueError(
                f"endpoint {name!r} has no scheme: pass endpoint='tcp://HOST:PORT' (a "
                "comma-separated list for several controllers) or set LRPILOT_ENDPOINT"
            )
        if name not in found:
            found.append(name)
    if not found:
        raise ValueError(
            f"no endpoint in {raw!r}: pass endpoint='tcp://HOST:PORT' or set LRPILOT_ENDPOINT"
        )
    return found


def resolve_job(job: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The job name: `job` if given, else `LRPILOT_JOB`.

    Raises:
        ValueError: no job anywhere, or a name the protocol would refuse.
    """
    source = "job="
    if job is None:
        job = _env(environ).get("LRPILOT_JOB") or None
        source = "LRPILOT_JOB"
    if job is None:
        raise ValueError(
            "lrpilot needs a job name: pass job=... (e.g. job='resnet-a') or set LRPILOT_JOB"
        )
    try:
        return check_name(job, "job")
    except ProtocolError as exc:
        raise ValueError(f"{source}: {exc.message}") from None


def _int_var(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _from_tf_config(raw: str) -> tuple[int, int] | None:
    try:
        config: Any = json.loads(raw)
    except ValueError:
        raise ValueError(f"TF_CONFIG is not valid JSON: {raw[:80]!r}") from None
    if not isinstance(config, dict):
        raise ValueError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not cluster or not task:
        return None  # e.g. TF_CONFIG="{}": a single worker
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError("TF_CONFIG: 'cluster' and 'task' must be objects")
    chiefs = cluster.get("chief") or []
    workers = cluster.get("worker") or []
    if not isinstance(chiefs, list) or not isinstance(workers, list):
        raise ValueError("TF_CONFIG: cluster.chief and cluster.worker must be lists")
    kind, index = task.get("type"), task.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"TF_CONFIG: task.index must be a non-negative integer, got {index!r}")
    world = len(chiefs) + len(workers)
    if kind == "chief":
        rank = index
    elif kind == "worker":
        rank = len(chiefs) + index
    else:
        raise ValueError(
            f"TF_CONFIG: task type {kind!r} does not train; only chief and worker tasks report "
            "(pass rank= and world= to override)"
        )
    if rank >= world:
        raise ValueError(f"TF_CONFIG: task {kind}:{index} is not in the cluster")
    return rank, world


def _from_environment(environ: Mapping[str, str]) -> tuple[int, int]:
    raw = environ.get("TF_CONFIG")
    if raw:
        found = _from_tf_config(raw)
        if found is not None:
            return found
    for rank_var, world_var in _RANK_WORLD_VARS:
        if rank_var in environ and world_var in environ:
            return _int_var(environ, rank_var), _int_var(environ, world_var)
    return 0, 1


def resolve_rank_world(
    rank: int | None = None,
    world: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """This process's (rank, world size): the arguments, else the launcher's environment.

    Args:
        rank: 0-based rank of this worker; None reads it from the environment.
        world: number of workers of the job; None reads it from the environment.
        environ: the environment to read (default `os.environ`).

    Raises:
        ValueError: a malformed variable, or a rank outside 0..world-1.

    Example:

        resolve_rank_world(environ={"RANK": "1", "WORLD_SIZE": "4"})   # (1, 4)
    """
    if rank is None or world is None:
        env_rank, env_world = _from_environment(_env(environ))
        rank = env_rank if rank is None else rank
        world = env_world if world is None else world
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an integer >= 1, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an integer in 0..{world - 1}, got {rank!r}")
    return rank, world


@dataclass(frozen=True)
class CurveKeys:
    """The keys a CURVE client needs: the controller's public key and its own key pair."""

    server_public: bytes
    public: bytes
    secret: bytes


def curve_keys(environ: Mapping[str, str] | None = None) -> CurveKeys | None:
    """CURVE keys from `LRPILOT_CURVE_SERVER_KEY` / `LRPILOT_CURVE_SECRET_KEY`, or None.

    Raises:
        ValueError: only one of the two is set, a file does not load, or libzmq lacks CURVE.
    """
    env = _env(environ)
    server_path = env.get("LRPILOT_CURVE_SERVER_KEY") or None
    secret_path = env.get("LRPILOT_CURVE_SECRET_KEY") or None
    if server_path is None and secret_path is None:
        return None
    if server_path is None or secret_path is None:
        raise ValueError(
            "CURVE needs both LRPILOT_CURVE_SERVER_KEY (the controller's .key file) and "
            "LRPILOT_CURVE_SECRET_KEY (this client's .key_secret file); set both or neither"
        )
    import zmq
    import zmq.auth

    if not zmq.has("curve"):
        raise ValueError("LRPILOT_CURVE_* is set but this libzmq has no CURVE support")
    try:
        server_public, _ = zmq.auth.load_certificate(server_path)
        public, secret = zmq.auth.load_certificate(secret_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a CURVE certificate: {exc}") from None
    if secret is None:
        raise ValueError(
            f"LRPILOT_CURVE_SECRET_KEY={secret_path} holds no secret key; "
            "point it at the .key_secret file `lrpilot keygen` wrote"
        )
    return CurveKeys(server_public=server_public, public=public, secret=secret)
