"""The folder `doppel export -o DIR` writes in: which of its files doppel wrote, and nothing else touched.

    DIR/.doppel-export          the marker: {"format": "doppel-export/1", "files": [every file doppel wrote here]}
    DIR/.doppel-export-PID/     the work folder of the export running as process PID, marked (.doppel-work:
                                "doppel-export HOST PID"); its files are moved into DIR at the end

A file of DIR is replaced only when the marker lists it. An export written before the marker existed is known by
its manifest, export.json, when that holds exactly the keys doppel wrote (source, files, modelfiles, pairs,
context) in their shapes: then it and the files it names, and README.md, are doppel's. A work folder is removed
by a later export only when its process is gone, and it is marked as this machine's, or (left by a version that did
not mark it) holds nothing but what an export puts there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from doppel import workfolder
from doppel.errors import ConfigError

MARKER, FORMAT = ".doppel-export", "doppel-export/1"
MANIFEST, README = "export.json", "README.md"
MANIFEST_KEYS = {"source", "files", "modelfiles", "pairs", "context"}
WORK = re.compile(r"\.doppel-export-([0-9]+)")
WORK_FILE = re.compile(r".+\.gguf|.+\.Modelfile|README\.md|export\.json|\.doppel-export|\.doppel-work")


def work_folder(out: Path) -> Path:
    """A new work folder in `out` for this process, marked with it and this machine."""
    work = out / f".doppel-export-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)  # an export of this process id that was killed
    work.mkdir()
    workfolder.mark(work, "export")
    return work


def written(out: Path) -> set[str]:
    """The names of the files in `out` that a doppel export wrote (by its marker, or an earlier export's manifest)."""
    marker = _json(out / MARKER)
    if isinstance(marker, dict) and marker.get("format") == FORMAT and _names(marker.get("files")):
        return {MARKER, *marker["files"]}
    manifest = _json(out / MANIFEST)
    if not (isinstance(manifest, dict) and set(manifest) == MANIFEST_KEYS and isinstance(manifest["files"], dict)
            and _names(list(manifest["files"].values())) and _names(manifest["modelfiles"])
            and isinstance(manifest["pairs"], list) and isinstance(manifest["context"], int)):
        return set()
    return {MANIFEST, README, *manifest["files"].values(), *manifest["modelfiles"]}


def check(out: Path, names: Iterable[str]) -> None:
    """Refuse (`ConfigError`) to write any of `names` over a file in `out` that no doppel export wrote."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; choose a directory")
    ours = written(out) if out.is_dir() else set()
    for name in names:
        path = out / name
        if (path.is_symlink() or path.exists()) and (name not in ours or path.is_dir()):
            raise ConfigError(f"{path} exists and doppel did not write it; choose another directory")


def install(work: Path, out: Path) -> None:
    """Move the files of `work` into `out` (checked again: converting took a while), then the marker listing them
    with the files of an earlier export still there; written last, so that it never lists a file not doppel's."""
    (work / workfolder.MARK).unlink(missing_ok=True)
    names = sorted(p.name for p in work.iterdir())
    check(out, [*names, MARKER])
    files = sorted(((written(out) - {MARKER}) & {p.name for p in out.iterdir()}) | set(names))
    for name in names:
        (work / name).replace(out / name)
    (work / MARKER).write_text(json.dumps({"format": FORMAT, "files": files}) + "\n", encoding="utf-8")
    (work / MARKER).replace(out / MARKER)


def remove_stale(out: Path) -> list[Path]:
    """Remove the work folders in `out` of exports whose process is gone (killed); the folders removed."""
    removed = []
    for folder in sorted(out.glob(".doppel-export-*")):
        match = WORK.fullmatch(folder.name)
        if match and (workfolder.left_by_dead_process(folder, "export", int(match[1]))
                      or _unmarked_and_dead(folder, int(match[1]))):
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def _unmarked_and_dead(folder: Path, pid: int) -> bool:
    """A work folder of an earlier version (no mark) whose process is gone, holding the model folder `hf` and the
    export's files, nothing else."""
    if folder.is_symlink() or not folder.is_dir() or (folder / workfolder.MARK).exists() or pid == os.getpid() \
            or workfolder.alive(pid):
        return False
    return all((p.name == "hf" and p.is_dir() and not p.is_symlink()) or (WORK_FILE.fullmatch(p.name) and p.is_file())
               for p in folder.iterdir())


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _names(values: Any) -> bool:
    """A list of plain file names, none a path."""
    return isinstance(values, list) and all(isinstance(v, str) and v not in ("", ".", "..") and "/" not in v
                                            and "\\" not in v for v in values)
