"""Where a store's scheduler service listens, and who may talk to it.

One service per store: its lock file and Unix socket are named by a hash of the store's resolved
path, in the user's runtime directory (``slmtui.paths.runtime_dir``), which is the user's own
(0700). The socket itself is 0600, and the service also checks each peer's uid
(``SO_PEERCRED``): another user on a shared GPU box can neither read the events nor send a
command.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from slmtui import paths
from slmtui.errors import UserError


@dataclass(frozen=True)
class Address:
    """The files of one store's service."""

    db: Path
    """The store, resolved."""
    socket_path: Path
    lock_path: Path
    log_path: Path
    """The service's own stderr (its workers log per run under the data dir)."""


def service_address(db: str | os.PathLike[str]) -> Address:
    """The service files for the store at ``db`` (the runtime directory is created 0700)."""
    resolved = Path(db).expanduser().resolve()
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    folder = private_dir(paths.runtime_dir())
    return Address(
        db=resolved,
        socket_path=folder / f"{key}.sock",
        lock_path=folder / f"{key}.lock",
        log_path=folder / f"{key}.log",
    )


def private_dir(path: Path) -> Path:
    """Create ``path`` 0700, or check that an existing one is a directory of ours (not a link)
    and make it 0700; a folder someone else owns is refused (one line)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise UserError(f"runtime folder {path}: {exc.strerror}; set SLMTUI_RUNTIME_DIR") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise UserError(f"runtime folder {path}: not a folder owned by you; set SLMTUI_RUNTIME_DIR")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (Linux ``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def peer_allowed(uid: int, owner_uid: int | None = None) -> bool:
    """Only the service's own user may attach (root included: no exception for it)."""
    return uid == (os.getuid() if owner_uid is None else owner_uid)
