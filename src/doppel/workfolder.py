"""The hidden work folders of `prepare` and `export`, which a killed process (SIGKILL, a power cut) leaves behind.

Each is marked with a file `.doppel-work` holding `doppel-KIND HOST PID`: the command, the machine and the process
that made it. A later run removes a folder only when the mark names this machine and a process that is gone; a
folder without the mark, of another machine (a shared disk) or of a live process is never touched.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

MARK = ".doppel-work"


def mark(folder: Path, kind: str) -> None:
    """Mark `folder` as the work folder of this process's `kind` ("prepare", "export")."""
    (folder / MARK).write_text(_line(kind, os.getpid()), encoding="utf-8")


def left_by_dead_process(folder: Path, kind: str, pid: int | None = None) -> bool:
    """Whether `folder` is marked as `kind`'s work folder on this machine by a process (`pid`, if given) that is
    gone."""
    if folder.is_symlink() or not folder.is_dir() or (folder / MARK).is_symlink():
        return False
    try:
        text = (folder / MARK).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    head = f"doppel-{kind} {socket.gethostname()} "
    found = text.removeprefix(head).removesuffix("\n")
    if not text.startswith(head) or not found.isdigit() or (pid is not None and int(found) != pid):
        return False
    return int(found) != os.getpid() and not alive(int(found))


def alive(pid: int) -> bool:
    """Whether a process `pid` exists; another user's process, or a number too large for one, counts as alive (kept,
    to be safe)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _line(kind: str, pid: int) -> str:
    return f"doppel-{kind} {socket.gethostname()} {pid}\n"
