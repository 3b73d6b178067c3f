"""Who may steer which job: CURVE keys from the authorized dir and their `jobs` globs.

With CURVE on, libzmq's ZAP handshake admits only keys found in
`--curve-authorized-dir`, and every message then carries the sender's
User-Id (the z85 of its public key). A certificate may carry metadata
`jobs = "bert-*,gpt-*"` (`lrpilot keygen DIR --jobs 'bert-*'`): that key may
only say hello and report for matching jobs, and on the admin socket only see
and steer those jobs; a key without `jobs` may use any job. The dir is
re-read on SIGHUP, `lrpilot reload` and every policy-file change; a removed
key is refused from its next message, not only at its next handshake.
"""

from __future__ import annotations

import fnmatch
import logging
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Authorizer", "Grant", "audit_author", "peer_uid", "read_certificate", "write_jobs"]

log = logging.getLogger("lrpilot.controller")

_LINE = re.compile(r'^\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"(.*)"|(.*?))\s*$')


@dataclass(frozen=True)
class Grant:
    """What one authorized key may do: every job (`globs` None) or the matching ones."""

    name: str
    globs: tuple[str, ...] | None = None

    def allows(self, job: str) -> bool:
        return self.globs is None or any(fnmatch.fnmatchcase(job, g) for g in self.globs)

    @property
    def unrestricted(self) -> bool:
        return self.globs is None


def read_certificate(path: Path) -> tuple[str, dict[str, str]]:
    """The z85 public key and the metadata of a `zmq.auth` certificate file.

    Raises:
        ValueError: the file holds no public key.
    """
    section = ""
    public = ""
    metadata: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not raw[:1].isspace():
            section = line.strip()
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        value = m.group(2) if m.group(2) is not None else m.group(3)
        if section == "curve" and m.group(1) == "public-key":
            public = value
        elif section == "metadata":
            metadata[m.group(1)] = value
    if len(public) != 40:
        raise ValueError(f"{path}: no CURVE public key")
    return public, metadata


class Authorizer:
    """The grants of the keys in an authorized dir, by User-Id (z85 public key).

    Args:
        directory: `--curve-authorized-dir`; every `*.key` file in it is a client key.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.grants: dict[str, Grant] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the dir; a key no longer there is refused from its next message."""
        grants: dict[str, Grant] = {}
        try:
            paths = sorted(self.directory.glob("*.key"))
        except OSError as exc:
            log.error("cannot read the authorized dir %s: %s", self.directory, exc)
            return
        for path in paths:
            try:
                public, metadata = read_certificate(path)
            except (OSError, ValueError) as exc:
                log.error("ignoring authorized key %s: %s", path, exc)
                continue
            jobs = metadata.get("jobs")
            globs = None if jobs is None else tuple(g.strip() for g in jobs.split(",") if g.strip())
            grants[public] = Grant(metadata.get("name", path.stem), globs)
        if grants.keys() != self.grants.keys():
            log.info("authorized keys from %s: %d", self.directory, len(grants))
        self.grants = grants

    def grant(self, user_id: str | None) -> Grant | None:
        """The grant of the key a message came from; None for a key no longer authorized."""
        return None if user_id is None else self.grants.get(user_id)


def write_jobs(public_file: Path, globs: str) -> None:
    """Add `jobs = "GLOBS"` to the metadata of a public certificate `keygen` wrote."""
    lines = public_file.read_text(encoding="utf-8").splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.strip() == "metadata") + 1
    lines.insert(at, f'    jobs = "{globs}"\n')
    public_file.write_text("".join(lines), encoding="utf-8")


def peer_uid(peer_address: str | None) -> int | None:
    """The uid of an `ipc://` peer from its ZeroMQ `Peer-Address` (`HOST:UID:GID:PID`, which
    libzmq fills from SO_PEERCRED on Linux); None for TCP peers and other systems."""
    if not peer_address:
        return None
    parts = peer_address.rsplit(":", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return int(parts[1])


def audit_author(grant: Grant | None, uid: int | None, claimed: object) -> str:
    """Who made an admin change, for the audit log: the identity the controller checked.

    The CURVE key's name when CURVE is on; else the peer's user on an `ipc://` socket
    (`alice (uid 1000)`); else the name the caller sent, marked as merely claimed
    (`claimed:alice@host`): over plain TCP nobody vouches for it.
    """
    if grant is not None:
        return grant.name
    if uid is not None:
        try:
            return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
        except KeyError:  # a uid with no passwd entry (containers)
            return f"uid {uid}"
    name = "".join(ch for ch in str(claimed or "") if ch.isprintable())[:200]
    return f"claimed:{name or 'unknown'}"
