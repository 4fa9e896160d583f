"""Benchmarks that print figures (not timed tests).

    doppel bench prepare --messages 1000000

generates a synthetic export in Telegram Desktop's byte format, then times, each in a fresh
process, Python's `json.load` of the file and `doppel prepare` of it, with peak memory (max RSS).

    doppel bench train --dataset DIR [--model M] [--mode lora|qlora|full] [--json OUT]

trains doppel's way and the reference recipe's way (pad each micro-batch to its longest row,
batches grouped by length, no packing) on the same sessions, one after the other in one process,
and reports target tokens/s, all real tokens/s, step time, peak memory and, on a GPU, the model
FLOPs utilisation.

    doppel bench recall [--messages N] [--locomo FILE…]

measures the memory's retrieval on the labelled Russian/English fixture, the index of a synthetic export and
a reply with memory, and the evidence recall over LoCoMo conversations (evaluation/locomo.py).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
from doppel.preparing.pipeline import prepare
t = time.perf_counter()
stats = prepare(Path(sys.argv[1]), Path(sys.argv[2]), PrepareConfig(memory=False))  # bench recall times that
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

_READ_LINES = """
import resource, sys, time
t = time.perf_counter()
with open(sys.argv[1], encoding="utf-8") as f:
    lines = f.readlines()
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _run(script: str, *args: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[0]), int(out[1]) / 1024  # seconds, MiB (ru_maxrss is KiB on Linux)


PREPARE_FORMATS = ("telegram", "whatsapp", "discord")


def bench_prepare(messages: int, chats: int, keep: Path | None,
                  formats: tuple[str, ...] = ("telegram",)) -> dict[str, Any]:
    """Per format: a synthetic export of `messages` messages, then, each in a fresh process, the baseline (Python's
    `json.load` of the file; for WhatsApp's text, reading it into lines) and `doppel prepare` of it (without the
    memory, which `bench recall` times), with peak memory. One format: its figures; several: {format: figures}."""
    from doppel.readers import synthetic

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in formats:
            name = {"telegram": "result.json", "whatsapp": "WhatsApp Chat with Friend 1.txt",
                    "discord": "Direct Messages - Friend 1.json"}[kind]
            export = (keep or Path(tmp)) / name
            if not export.exists():
                export.parent.mkdir(parents=True, exist_ok=True)
                with export.open("wb") as handle:
                    if kind == "telegram":
                        synthetic.write_large_export(handle, messages, chats)
                    elif kind == "whatsapp":
                        synthetic.write_large_whatsapp(handle, messages)
                    else:
                        synthetic.write_large_discord(handle, messages)
            baseline = "read_lines" if kind == "whatsapp" else "json_load"
            base_s, base_mb = _run(_READ_LINES if kind == "whatsapp" else _JSON_LOAD, str(export))
            data = Path(tmp) / f"data-{kind}"
            prep_s, prep_mb = _run(_PREPARE, str(export), str(data))
            stats = json.loads((data / "stats.json").read_text())
            out[kind] = {"messages": messages, "file_mb": round(export.stat().st_size / 2**20, 1),
                         f"{baseline}_s": round(base_s, 2), f"{baseline}_peak_mb": round(base_mb),
                         "prepare_s": round(prep_s, 2), "prepare_peak_mb": round(prep_mb),
                         "prepare_messages_per_s": round(messages / prep_s),
                         "sessions": stats["sessions"]["train"] + stats["sessions"]["eval"],
                         "machine": f"{platform.machine()}, {platform.python_version()}"}
    return out[formats[0]] if len(formats) == 1 else out


# --- training throughput ----------------------------------------------------------------------

REFERENCE_BATCH = {"lora": 8, "qlora": 8, "full": 2}  # the reference recipe's micro-batches
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12,
             "RTX 3090": 71e12}  # dense bf16 FLOP/s of each GPU


def _reset_peak_rss() -> None:
    """Start the process's peak RSS afresh (Linux), so that each recipe's figure is its own: what the last recipe
    freed goes back to the system first (glibc keeps freed heap otherwise, and it would count again)."""
    import contextlib
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    """Peak RSS in bytes since the last `_reset_peak_rss` (Linux; elsewhere the process's whole-life peak)."""
    import resource

    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.machine()}, {os.cpu_count()} threads)"


def subset(dataset: Path, out: Path, tokenizer: Any, target_tokens: int, max_length: int) -> int:
    """Write a dataset of the first training sessions holding `target_tokens` target tokens."""
    from dataclasses import replace

    from doppel import dataset as ds
    from doppel.render import IGNORE, encode

    source = ds.Dataset.open(dataset)
    total, lines = 0, []
    for session in source.sessions("train"):
        total += sum(label != IGNORE for _, labels in encode(session, tokenizer, max_length) for label in labels)
        lines.append(ds.jsonl_line(session))
        if total >= target_tokens:
            break
    out.mkdir(parents=True)
    (out / ds.TRAIN_FILE).write_bytes(b"".join(lines))
    (out / ds.EVAL_FILE).write_text("", encoding="utf-8")
    replace(source.stats, train_sessions=len(lines), eval_sessions=0).write(out)
    return total


def matmul_params(model_name: str | None) -> int:
    """Weights that take part in matrix products per token: every Linear (lm_head too), not the lookup."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from doppel import models

    if model_name is None or model_name.startswith(models.RANDOM):
        folder = models.embedded_dir() if model_name is None else models.random_dir(model_name)
        kwargs = {"gguf_file": models.EMBEDDED_FILE} if model_name is None else {}
        config = AutoConfig.from_pretrained(str(folder), **kwargs)
    else:
        config = AutoConfig.from_pretrained(model_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _measure(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Steady-state figures from metrics rows (the first tenth of the steps is warm-up)."""
    warm = max(1, len(rows) // 10)
    first, last = rows[warm - 1], rows[-1]
    seconds = last["train_seconds"] - first["train_seconds"]
    return {"tokens_per_s": round((last["target_tokens"] - first["target_tokens"]) / seconds, 1),
            "all_tokens_per_s": round((last["tokens"] - first["tokens"]) / seconds, 1),
            "step_time_s": round(seconds / (last["step"] - first["step"]), 4),
            "steps": last["step"], "measured_steps": last["step"] - first["step"]}


def bench_train(dataset: Path, model: str | None, mode: str, target_tokens: int, batch_size: int,
                gradient_checkpointing: str, max_length: int = 1024, attention: str = "auto",
                precision: str = "auto") -> dict[str, Any]:
    import torch

    from doppel import models
    from doppel.config import TrainConfig
    from doppel.run import Run
    from doppel.training.train import train

    cuda = torch.cuda.is_available()
    tokenizer = models.load_tokenizer(model)
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    common: dict[str, Any] = {"model": model, "mode": mode, "max_length": max_length, "epochs": 1.0, "logging_steps": 1,
              "save_steps": 10**9, "optim": "adamw_8bit" if mode == "full" and cuda else "auto",
              "gradient_checkpointing": gradient_checkpointing, "precision": precision}
    setups = {"reference": TrainConfig(**common, packing=False, batch_size=REFERENCE_BATCH[mode],
                                       attention="sdpa"),
              "doppel": TrainConfig(**common, packing=True, batch_size=batch_size, liger=liger, attention=attention)}  # type: ignore[arg-type]
    device = _device()
    result: dict[str, Any] = {"device": device, "model": models.base_name(model), "mode": mode}
    with tempfile.TemporaryDirectory() as tmp:
        result["target_tokens"] = subset(dataset, Path(tmp) / "data", tokenizer, target_tokens, max_length)
        for name, cfg in setups.items():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            else:
                _reset_peak_rss()
            info = train(Path(tmp) / "data", Path(tmp) / name, cfg, save=False)
            rows = [r for r in Run(Path(tmp) / name).metrics() if "loss" in r]
            figures = _measure(rows)
            figures["batch"] = f"{cfg.batch_size} row{'s' if cfg.batch_size != 1 else ''}, " + \
                ("packed to" if cfg.packing else "padded, up to") + f" {max_length} tokens"
            figures["peak_memory_gb"] = round((torch.cuda.max_memory_allocated() if cuda else _peak_rss()) / 2**30, 2)
            figures["liger"] = cfg.liger
            figures["attention"], figures["precision"] = info.attention, info.precision
            result[name] = figures
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None) if cuda else None
    if peak:
        flops_per_token = (6 if mode == "full" else 4) * matmul_params(model)
        for name in setups:
            result[name]["mfu"] = round(result[name]["all_tokens_per_s"] * flops_per_token / peak, 4)
    result["speedup"] = round(result["doppel"]["tokens_per_s"] / result["reference"]["tokens_per_s"], 2)
    return result


# --- generation speed -------------------------------------------------------------------------


def bench_chat(run: Path | None, tokens: int, repeats: int, engines: Sequence[str] = ("transformers", "llama.cpp"),
               files: Sequence[Path] = ()) -> dict[str, Any]:
    """Time to first token and tokens/s of one persona reply (greedy, `tokens` new tokens, no early stop), on each
    engine side by side: transformers, and llama.cpp on each GGUF file of the run's export (or `files`). llama.cpp
    is skipped, and said so, where llama-cpp-python is not installed or there is no file."""
    import gc

    from doppel import models
    from doppel.engines import llama_cpp_installed
    from doppel.run import Run, open_model

    targets: list[tuple[str, Path | None]] = [("transformers", None)] if "transformers" in engines else []
    skipped = None
    if "llama.cpp" in engines:
        if not llama_cpp_installed():
            skipped = "llama.cpp: llama-cpp-python is not installed"
        elif files:
            targets += [("llama.cpp", Path(f)) for f in files]
        elif run is None:
            skipped = "llama.cpp: give the embedded model's GGUF files with --gguf"
        else:
            found = Run.open(run).gguf_files() if (Path(run) / "run.json").is_file() else {}
            targets += [("llama.cpp", file) for file in found.values()]
            skipped = None if found else f"llama.cpp: {run} has no GGUF export (doppel export)"
    rows: list[dict[str, Any]] = []
    prompt = 0
    for engine, file in targets:
        loaded = open_model(run, engine, file)
        prompt, row = _time_replies(loaded, tokens, repeats)
        rows.append({"engine": engine, "file": file.name if file else None, **row})
        del loaded
        gc.collect()
    base = next((r["tokens_per_s"] for r in rows if r["engine"] == "transformers"), None)
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / base, 2) if base else None
    return {"device": _device(), "model": str(run) if run else models.base_name(None), "prompt_tokens": prompt,
            "new_tokens": tokens, "repeats": repeats, "engines": rows, **({"skipped": skipped} if skipped else {})}


def _time_replies(loaded: Any, tokens: int, repeats: int) -> tuple[int, dict[str, Any]]:
    """(prompt tokens, the medians of the repeats after one warm-up), each reply from a cold prompt."""
    import threading
    import time

    from doppel.config import Sampling
    from doppel.serving.chat import Conversation

    conversation = Conversation(loaded.engine, loaded.tokenizer, "Me", "Friend",
                                Sampling(temperature=0, max_new_tokens=tokens))
    conversation.add(["hey", "what's up?"])
    ids = conversation.prompt_ids()
    engine = conversation.engine
    firsts, rates = [], []
    for _ in range(repeats + 1):  # the first round warms up
        engine.forget()  # no prompt cache: every reply evaluates its prompt
        start = time.perf_counter()
        first = None
        for _token in engine.tokens(ids, conversation.sampling, conversation.stops, threading.Event(), exact=True):
            first = first or time.perf_counter()
        end = time.perf_counter()
        firsts.append((first or end) - start)
        rates.append((tokens - 1) / (end - (first or start)))
    return len(ids), {"time_to_first_token_s": round(sorted(firsts[1:])[len(firsts[1:]) // 2], 3),
                      "tokens_per_s": round(sorted(rates[1:])[len(rates[1:]) // 2], 1)}


# --- memory -----------------------------------------------------------------------------------------

def bench_memory_recall() -> dict[str, Any]:
    """Recall@1 and @5 of dense, BM25 and hybrid retrieval on the labelled fixture (memory/labelled.py)."""
    import numpy as np

    from doppel.memory import index, labelled
    from doppel.memory.text import Encoder

    out: dict[str, Any] = {}
    encoder = Encoder()
    for name, pairs in (("across_languages", labelled.ACROSS), ("same_language", labelled.SAME)):
        snippets = list(dict.fromkeys([answer for _, answer in pairs] + labelled.DISTRACTORS))
        with tempfile.TemporaryDirectory() as tmp:
            from doppel.records import ChatRef, Session, Turn

            sessions = [(Session(str(i), ChatRef(1, "c", None), i, i, (Turn("A", "A", (text,), True),)), "train")
                        for i, text in enumerate(snippets)]
            index.build(sessions, Path(tmp), encoder=encoder)
            memory = index.Memory.open(Path(tmp))
        queries = encoder([q for q, _ in pairs])
        mask = np.ones(len(snippets), dtype=bool)
        hits = {method: [0, 0] for method in ("dense", "bm25", "hybrid")}
        for (query, answer), vector in zip(pairs, queries, strict=True):
            gold = snippets.index(answer)
            dense = (memory.vectors @ vector)[memory.rows]
            keyword = index._keyword_scores(memory._keywords, len(snippets), query, len(snippets))
            positive = np.flatnonzero(keyword > 0)
            ranked = {"dense": [int(i) for i in np.argsort(-dense, kind="stable")],
                      "bm25": [int(i) for i in positive[np.argsort(-keyword[positive], kind="stable")]],
                      "hybrid": index._fuse(dense, keyword, mask, memory._people, frozenset(), memory._ends)}
            for method, order in ranked.items():
                hits[method][0] += order[:1] == [gold]
                hits[method][1] += gold in order[:5]
        out[name] = {"queries": len(pairs), "entries": len(snippets),
                     **{f"{m}_recall_at_{k}": f"{h[j]}/{len(pairs)}" for m, h in hits.items()
                        for j, k in ((0, 1), (1, 5))}}
    return out


def bench_recall(messages: int, keep: Path | None, tokens: int, repeats: int, locomo: Sequence[Path] = (),
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The fixture's recall; with `messages`, the memory of a `messages`-message synthetic export (build, re-run,
    search) and a reply of the embedded model with memory against without; with `locomo` files, the evidence recall
    of each retrieval over those LoCoMo conversations (evaluation/locomo.py)."""
    result: dict[str, Any] = {}
    if locomo:  # first: a file that is not LoCoMo is told at once
        from doppel.evaluation import locomo as benchmark

        result["locomo"] = benchmark.measure(locomo, progress=progress)
    result["recall"] = bench_memory_recall()
    if messages:
        result.update(_memory_speed(messages, keep, tokens, repeats))
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    return result


def _memory_speed(messages: int, keep: Path | None, tokens: int, repeats: int) -> dict[str, Any]:
    """The memory of a `messages`-message synthetic export (build, re-run, search), and a reply of the embedded model
    with memory against without."""
    import time

    import torch

    from doppel.config import PrepareConfig
    from doppel.dataset import Dataset
    from doppel.engines import TransformersEngine
    from doppel.memory.index import Memory
    from doppel.memory.recall import Recall, for_turns
    from doppel.preparing.pipeline import prepare
    from doppel.readers.synthetic import write_large_export
    from doppel.run import open_model
    from doppel.serving.chat import Conversation

    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export = (keep or Path(tmp)) / "result.json"
        if not export.exists():
            export.parent.mkdir(parents=True, exist_ok=True)
            with export.open("wb") as handle:
                write_large_export(handle, messages)
        data = Path(tmp) / "data"
        began = time.perf_counter()
        prepare(export, Path(tmp) / "plain", PrepareConfig(memory=False))
        plain = time.perf_counter() - began
        began = time.perf_counter()
        stats = prepare(export, data, PrepareConfig())
        total = time.perf_counter() - began
        began = time.perf_counter()
        again = prepare(export, data, PrepareConfig())
        rerun = time.perf_counter() - began
        memory = Memory.open(data / "memory")
        queries = ["see you at the station tomorrow?", "пойдём гулять", "what are you doing tonight", "да нет"]
        memory.search("warm up")  # loads the sentence encoder (about a second, once)
        began = time.perf_counter()
        for query in queries * 5:
            memory.search(query)
        search_ms = (time.perf_counter() - began) / (len(queries) * 5) * 1000
        loaded = open_model(None)
        assert isinstance(loaded.engine, TransformersEngine)  # the embedded model: transformers
        sessions = list(itertools.islice(Dataset.open(data).sessions("train"), 2000))
        began = time.perf_counter()
        for_turns(memory, sessions, loaded.tokenizer, 256, {"train"})
        per_session = (time.perf_counter() - began) / len(sessions)
        recalled = sum(1 for s in sessions for i, t in enumerate(s.turns) if i and t.train)
        result["index"] = {"messages": messages, "entries": stats.memory["entries"],
                           "prepare_without_memory_s": round(plain, 1), "prepare_s": round(total, 1),
                           "rerun_embedded": again.memory["embedded"], "rerun_prepare_s": round(rerun, 1),
                           "search_ms": round(search_ms, 1),
                           "training_recall_ms_per_session": round(per_session * 1000, 2),
                           "training_recall_ms_per_turn": round(per_session * len(sessions) / max(1, recalled)
                                                                * 1000, 2)}
        times = {}
        for label, recall in (("without", None), ("with", Recall(memory, 256))):
            chat = Conversation(loaded.engine, loaded.tokenizer, "Me Owner", "Friend 1", memory=recall)
            chat.add(["hey", "what are you doing tonight?"])
            runs = []
            for k in range(repeats + 1):  # the first round warms up
                began = time.perf_counter()
                ids = chat.prompt_ids()  # the search and the block, with memory
                with torch.inference_mode():  # `tokens` new tokens each way: no early end
                    loaded.engine.model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens,
                                          do_sample=False)
                if k:
                    runs.append(time.perf_counter() - began)
            times[label] = (sorted(runs)[len(runs) // 2], len(ids))
        result["reply"] = {"new_tokens": tokens, "without_s": round(times["without"][0], 3),
                           "with_s": round(times["with"][0], 3), "prompt_tokens_without": times["without"][1],
                           "prompt_tokens_with": times["with"][1],
                           "ratio": round(times["with"][0] / times["without"][0], 2)}
    return result
