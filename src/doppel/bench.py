"""Benchmarks that print figures (not timed tests).

    python -m doppel.bench prepare --messages 1000000

generates a synthetic export in Telegram Desktop's byte format, then times, each in a fresh
process, Python's `json.load` of the file and `doppel prepare` of it, with peak memory (max RSS).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

_JSON_LOAD = """
import json, resource, sys, time
t = time.perf_counter()
with open(sys.argv[1], encoding="utf-8", errors="surrogateescape") as f:
    data = json.load(f)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

_PREPARE = """
import resource, sys, time
from pathlib import Path
from doppel.config import PrepareConfig
from doppel.dataset import prepare
t = time.perf_counter()
stats = prepare(Path(sys.argv[1]), Path(sys.argv[2]), PrepareConfig())
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _run(script: str, *args: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[0]), int(out[1]) / 1024  # seconds, MiB (ru_maxrss is KiB on Linux)


def bench_prepare(messages: int, chats: int, keep: Path | None) -> dict[str, float | int | str]:
    from doppel.synthetic import write_large_export

    with tempfile.TemporaryDirectory() as tmp:
        export = (keep or Path(tmp)) / "result.json"
        if not export.exists():
            with export.open("wb") as handle:
                write_large_export(handle, messages, chats)
        load_s, load_mb = _run(_JSON_LOAD, str(export))
        prep_s, prep_mb = _run(_PREPARE, str(export), str(Path(tmp) / "data"))
        stats = json.loads((Path(tmp) / "data" / "stats.json").read_text())
        return {"messages": messages, "file_mb": round(export.stat().st_size / 2**20, 1),
                "json_load_s": round(load_s, 2), "json_load_peak_mb": round(load_mb),
                "prepare_s": round(prep_s, 2), "prepare_peak_mb": round(prep_mb),
                "prepare_messages_per_s": round(messages / prep_s),
                "sessions": stats["sessions"]["train"] + stats["sessions"]["eval"],
                "machine": f"{platform.machine()}, {platform.python_version()}"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m doppel.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    prep = sub.add_parser("prepare", help="prepare speed and memory vs json.load")
    prep.add_argument("--messages", type=int, default=1_000_000)
    prep.add_argument("--chats", type=int, default=500)
    prep.add_argument("--keep", type=Path, help="directory to keep (and reuse) the export in")
    args = parser.parse_args()
    result = bench_prepare(args.messages, args.chats, args.keep)
    for key, value in result.items():
        print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
