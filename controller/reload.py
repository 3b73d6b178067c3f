"""Watching the policy file: notice a change within a second, whatever way it was made.

Polls `os.stat` of the path and of its resolved target, plus a SHA-256 of the
content, about every 200 ms: an in-place write, an editor's
write-to-temp-and-rename and a Kubernetes ConfigMap `..data` symlink swap
all change one of them. An unchanged hash is not a reload; a burst of edits is
debounced until the file has been stable for one poll; a file missing for
under a second (mid swap) is not an error. No dependency beyond the standard
library, and an idle check costs two `stat` calls.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["PolicyWatcher"]

Signature = tuple[int, int, int, int, int, int] | None


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

    def poll(self) -> str | None:
        """The new text when the file changed and has been stable for one poll, else None.

        Returns "" (empty) when the file has been missing for longer than the grace period.
        """
        signature = _stat_signature(self.path)
        now = self.clock()
        if signature is None:
            if self._missing_since is None:
                self._missing_since = now
            if now - self._missing_since >= self.missing_grace:
                self._missing_since = now  # report once per grace period
                return ""
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
            data = self.path.read_bytes()
        except OSError:
            return None
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.digest:
            return None
        self.digest = digest
        return data.decode("utf-8", errors="replace")

    def accept(self, digest: str) -> None:
        """Record the digest now in force (after an explicit reload)."""
        self.digest = digest
