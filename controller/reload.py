"""Watching the policy file: notice a change within a second, whatever way it was made.

Polls `os.stat` of the path and of its resolved target, plus a SHA-256 of the
content, about every 200 ms: an in-place write, an editor's
write-to-temp-and-rename and a Kubernetes ConfigMap `..data` symlink swap
all change one of them. An unchanged hash is not a reload; a burst of edits is
debounced until the file has been stable for one poll; a file missing for
under a second (mid swap) is not an error. No dependency beyond the standard
library, and an idle check costs two `stat` calls.

`PolicyLoader` runs the watcher, reads and validates the file in a thread of
its own, so a huge or slow file never delays a decision; the daemon's loop only
swaps in a validated `PolicySet` (or records the errors).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PolicyError, PolicyFileError
from .policyfile import PolicySet, load_text

__all__ = [
    "MAX_POLICY_BYTES",
    "Loaded",
    "PolicyFileError",
    "PolicyLoader",
    "PolicyWatcher",
    "parse",
    "quiet_gc",
]

#: Larger policy files are rejected without being read.
MAX_POLICY_BYTES = 10 << 20


def read_policy(path: Path) -> bytes:
    """The policy file's bytes, or a PolicyFileError saying why not."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PolicyFileError(f"{path}: policy file is missing") from None
    except OSError as exc:
        why = "a symlink loop" if exc.errno == errno.ELOOP else exc.strerror
        raise PolicyFileError(f"{path}: cannot read policy file: {why}") from None
    if stat.S_ISDIR(st.st_mode):
        raise PolicyFileError(f"{path}: policy file is a directory")
    if st.st_size > MAX_POLICY_BYTES:
        raise PolicyFileError(
            f"{path}: policy file of {st.st_size} bytes is over {MAX_POLICY_BYTES} (10 MiB); "
            "not read"
        )
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyFileError(f"{path}: cannot read policy file: {exc.strerror}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyFileError(f"{path}: policy file is over {MAX_POLICY_BYTES} bytes; not read")
    return data


Signature = tuple[int, int, int, int, int, int, int] | None


def _stat_signature(path: Path) -> Signature:
    try:
        link = os.stat(path, follow_symlinks=False)
        target = os.stat(path)  # follows every symlink, ..data included
    except OSError:
        return None
    return (
        link.st_ino,
        link.st_mtime_ns,
        target.st_ino,
        target.st_mtime_ns,
        target.st_size,
        target.st_ctime_ns,
        target.st_mode,
    )


class PolicyWatcher:
    """Tells when the policy file's content has changed and settled.

    Args:
        path: the policy file as given on the command line.
        digest: SHA-256 hex of the content currently in force.
        clock: monotonic seconds (injected for tests).
        missing_grace: how long a vanished file is a swap in progress, not an error.

    Example:

        watcher = PolicyWatcher("policy.yaml", policy_set.digest, time.monotonic)
        if (text := watcher.poll()) is not None:
            reload(text)
    """

    def __init__(
        self, path: str | Path, digest: str, clock: Callable[[], float], missing_grace: float = 1.0
    ) -> None:
        self.path = Path(path)
        self.digest = digest
        self.clock = clock
        self.missing_grace = missing_grace
        self._signature = _stat_signature(self.path)
        self._changed_at: float | None = None
        self._missing_since: float | None = None

    def poll(self) -> bytes | None:
        """The new content when the file changed and has been stable for one poll, else None.

        Raises:
            PolicyFileError: the file has been missing (or unreadable: a directory, a
                symlink loop...) for longer than the grace period; once per grace period.
        """
        signature = _stat_signature(self.path)
        now = self.clock()
        if signature is None or stat.S_ISDIR(signature[-1]):
            if self._missing_since is None:
                self._missing_since = now
            if now - self._missing_since >= self.missing_grace:
                self._missing_since = now  # report once per grace period
                self._signature = signature
                self.digest = ""  # whatever comes back next is news, even the same text
                read_policy(self.path)  # raises with the reason
            return None
        self._missing_since = None
        if signature != self._signature:
            self._signature = signature
            self._changed_at = now  # debounce: wait until a poll sees no further change
            return None
        if self._changed_at is None:
            return None
        self._changed_at = None
        try:
            data = read_policy(self.path)
        except PolicyFileError:
            self.digest = ""
            raise
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.digest:
            return None
        self.digest = digest
        return data

    def accept(self, digest: str) -> None:
        """Record the digest now in force (after an explicit reload)."""
        self.digest = digest


@dataclass(frozen=True)
class Loaded:
    """One outcome of reading the policy file: a validated set, or the errors.

    Args:
        source: what asked: `watch` (a change seen), `signal` (SIGHUP), `admin`.
        policies: the validated policy set, or None.
        errors: `FILE:LINE: message` lines when the file was rejected.
        token: the admin request waiting for this outcome, if any.
    """

    source: str
    policies: PolicySet | None = None
    errors: list[str] = field(default_factory=list)
    token: Any = None


class PolicyLoader:
    """Watches, reads and validates the policy file in a thread of its own.

    The daemon calls `request()` for an explicit reload (SIGHUP, `lrpilot reload`) and
    takes outcomes with `results()`; `wake` (a callable) is invoked after each outcome so
    a sleeping loop can take it at once.

    Args:
        path: the policy file.
        digest: SHA-256 hex of the content in force.
        clock: monotonic seconds.
        wake: called (from the loader's thread) when an outcome is ready.
        interval: seconds between watcher polls.
    """

    def __init__(
        self,
        path: str | Path,
        digest: str,
        clock: Callable[[], float],
        wake: Callable[[], None] = lambda: None,
        interval: float = 0.2,
    ) -> None:
        self.path = Path(path)
        self.watcher = PolicyWatcher(path, digest, clock)
        self.interval = interval
        self._wake = wake
        self._requests: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._results: queue.Queue[Loaded] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lrpilot-policy", daemon=True)
        self._thread.start()

    def request(self, source: str, token: Any = None) -> None:
        """Read the file now (whether or not it changed); the outcome comes as a result."""
        self._requests.put((source, token))

    def results(self) -> list[Loaded]:
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def accept(self, digest: str) -> None:
        """The content now in force (an explicit reload applied it)."""
        self.watcher.accept(digest)

    def close(self) -> None:
        self._stop.set()
        self._requests.put(("", None))
        self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                source, token = self._requests.get(timeout=self.interval)
            except queue.Empty:
                source, token = "watch", None
            if self._stop.is_set():
                return
            try:
                if source == "watch":
                    data = self.watcher.poll()
                    if data is None:
                        continue
                else:
                    data = read_policy(self.path)
                outcome = Loaded(source, parse(_text(data, self.path), str(self.path)))
            except PolicyFileError as exc:
                outcome = Loaded(source, errors=[str(exc)])
            except PolicyError as exc:
                outcome = Loaded(source, errors=[e.located() for e in exc.errors])
            self._results.put(Loaded(outcome.source, outcome.policies, outcome.errors, token))
            self._wake()


_GC_LOCK = threading.Lock()


def parse(text: str, file: str) -> PolicySet:
    """`load_text` with its garbage kept away from the cyclic collector.

    A 3.2 MB file (40,000 rules) makes millions of short-lived YAML objects. Left to the
    collector, they trigger full (generation 2) collections that walk the whole heap while
    holding the GIL, from this thread: the loop's replies waited up to 1.2 s. So the
    collector is off while the file is parsed (the temporary objects die by reference
    counting), and what survives — the new policy set with everything else alive — is
    frozen (`gc.freeze`, as servers do after start-up), so later full collections do not
    walk it either. The policy set holds no reference cycles: when a later reload replaces
    it, reference counting frees it.

    Raises:
        PolicyError: the file is not a valid policy.
    """
    with _GC_LOCK, _frozen_after():
        return load_text(text, file)


@contextlib.contextmanager
def _frozen_after() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.enable()


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Collector off while many long-lived objects are made (the jobs a start or a shard
    taken restores: 10,000 rows decoded into states), and those objects frozen after, as
    `parse` does. Without it the collector runs a generation-2 pass several times over a
    growing heap that holds no garbage. Skipped (nothing changed) while the loader thread
    is parsing a policy file: that one restores the collector itself when it is done.

    Example:
        with quiet_gc():
            table.restore(store.load_jobs(), now, wall)
    """
    if not _GC_LOCK.acquire(blocking=False):
        yield
        return
    try:
        with _frozen_after():
            yield
    finally:
        _GC_LOCK.release()


def _text(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyFileError(f"{path}: policy file is not UTF-8 ({exc.reason})") from None
