"""The durable spool: files that survive a crash at any instant.

Every file is written to ``tmp/`` on the same file system, flushed and fsynced, then
renamed into place, and the directory entry is fsynced too; a reader never sees a
half-written file, and after a crash a file either exists whole or not at all.
Leftovers in ``tmp/`` are deleted at start-up.

Several nodes may share one spool directory (a shared job database, docs/deploy.md):
each then writes its partial files to its own ``tmp/<node name>/`` and empties only
that one at start-up, never another live node's.  What this asks of the file system
(a shared one such as NFS mounted ``sync``): ``fsync`` of a file makes its bytes
durable on the server, ``rename`` within the spool is atomic and durable once the
directory is fsynced, and ``O_EXCL`` creation is exclusive.

Layout under ``spool_dir``::

    tmp/                               partial writes (emptied at start)
    tmp/<node name>/                   ... of one node, when several share the spool
    incoming/<study uid>/<sop uid>.dcm received instances
    outbox/<study uid>/<sop uid>.dcm   result objects awaiting delivery
    reports/<study uid>/<sop uid>.dcm  the latest SR of a study (predecessor of the next)
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path

from node.errors import SpoolError

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_uid(uid: str) -> str:
    """A UID checked to be usable as a file name component (PS3.5 9.1: digits and
    dots, at most 64 characters).  Anything else raises ``ValueError``."""
    uid = uid.strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise ValueError(f"not a valid UID: {uid[:80]!r}")
    return uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Atomic, fsynced file storage under one directory.

    Parameters
    ----------
    root
        The spool directory (created with mode 0700 if missing).
    min_free_bytes
        A write that would leave less than this free on the file system fails with
        :class:`SpoolError` before anything is written.
    node_name
        Set when several nodes share the spool: partial writes go to
        ``tmp/<node_name>/``, and only that directory is emptied at start-up.
    tmp_dir
        Set by a process that writes into the spool of a running node (its build
        processes, :mod:`node.builder`): partial writes go to that node's ``tmp``
        directory (names are unique), which is then *not* emptied here — it holds
        the node's own partial writes; the node empties it when it starts.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0, node_name: str | None = None,
                 tmp_dir: Path | None = None) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.tmp = tmp_dir or (root / "tmp" if node_name is None else root / "tmp" / node_name)
        for sub in (root, root / "tmp", self.tmp, root / "incoming", root / "outbox",
                    root / "reports"):
            sub.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        self._dir_lock = threading.Lock()
        if tmp_dir is not None:
            return
        for leftover in self.tmp.iterdir():
            if leftover.is_dir():  # another node's tmp/<name>/ in a shared spool
                continue
            logger.info("removing partial spool file left by an earlier process: %s", leftover.name)
            leftover.unlink(missing_ok=True)

    def path(self, area: str, study_instance_uid: str, sop_instance_uid: str) -> Path:
        """Where an object of ``area`` (incoming, outbox, reports) lives."""
        return (
            self.root / area / safe_uid(study_instance_uid) / f"{safe_uid(sop_instance_uid)}.dcm"
        )

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def write(self, target: Path, data: bytes | memoryview) -> None:
        """Write ``data`` to ``target`` atomically and durably.

        Raises
        ------
        SpoolError
            Not enough free space (below the floor) or the write/fsync failed; no
            partial file is left behind.
        """
        free = self.free_bytes()
        if free - len(data) < self.min_free_bytes:
            raise SpoolError(
                f"spool has {free // 2**20} MiB free, below the floor of "
                f"{self.min_free_bytes // 2**20} MiB after a {len(data)} byte write"
            )
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            parent = target.parent
            for attempt in range(3):
                if not parent.is_dir():
                    with self._dir_lock:
                        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                        _fsync_dir(parent.parent)
                try:
                    os.replace(tmp, target)
                    break
                except FileNotFoundError:
                    # In a shared spool another node may have removed the (then empty)
                    # study directory between our check and the rename: make it again.
                    if attempt == 2 or not tmp.exists():
                        raise
            _fsync_dir(parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise SpoolError(f"cannot write {target.name}: {reason}") from exc

    def remove(self, target: Path) -> None:
        """Delete a spool file and, if it was the last, its study directory."""
        target.unlink(missing_ok=True)
        try:
            target.parent.rmdir()
        except OSError:
            pass

    def remove_study(self, area: str, study_instance_uid: str) -> None:
        shutil.rmtree(self.root / area / safe_uid(study_instance_uid), ignore_errors=True)
