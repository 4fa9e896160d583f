"""A run directory: its files, its typed info, its checkpoints, and the model it holds.

    RUN/adapter_model.safetensors   LoRA/QLoRA adapter (full mode: model.safetensors + config.json)
    RUN/tokenizer.json …            the tokenizer, with ChatML tokens
    RUN/config.yaml                 the resolved training options (config.TrainConfig)
    RUN/metrics.jsonl               one JSON line per log step and evaluation
    RUN/run.json                    what the run was (RunInfo); written last: a run is finished when it exists
    RUN/dataset_stats.json          the dataset's stats (who the personas are)
    RUN/checkpoints/  RUN/tokens/   resumable checkpoints; the tokenized sessions (cached)
    RUN/eval/                       `doppel eval`'s report
    RUN/memory/remembered.jsonl     conversations held with the model under `--remember` (memory/index.py)
    RUN/gguf.json                   where `doppel export` last wrote its GGUF files (exporting/gguf.py)
    RUN/feedback.jsonl              the owner's corrections of replies, for preference tuning (feedback.py)
    RUN/preferences.jsonl           mode dpo: the pairs of real and generated turns (tuning/preferences.py)

`training/` writes it; chat, serve, eval, merge and bench read it through `Run.open` (or `open_model`, which
also takes a merged or Hugging Face model directory, or nothing for the embedded model).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doppel.config import TrainConfig
from doppel.dataset import DatasetStats
from doppel.engines import Engine, llama_cpp_installed
from doppel.errors import ModelError, RunError

RUN_FILE, CONFIG_FILE, METRICS_FILE, STATS_FILE = "run.json", "config.yaml", "metrics.jsonl", "dataset_stats.json"
CHECKPOINTS, TOKENS, EVAL_DIR, MEMORY_DIR = "checkpoints", "tokens", "eval", "memory"
GGUF_POINTER = "gguf.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """What run.json says about a finished run."""

    base: str | None  # the base model as given (None: the embedded one)
    mode: str  # lora, qlora, full, or dpo (a LoRA adapter: the --from run's, with the preference step's stacked on)
    steps: int
    epochs: float
    train_loss: float  # the mean over all of the run's steps
    eval_loss: float | None
    dataset: str
    owner_id: str | None = None
    owner_name: str | None = None
    attention: str = "sdpa"
    precision: str = "fp32"
    processes: int = 1
    distributed: str = "no"
    finished: str = ""
    plan: dict[str, Any] = field(default_factory=dict)  # how it trained here: device, rows, optimizer, …
    memory_tokens: int | None = None  # trained with memory blocks of at most this many tokens; None: without
    from_run: str | None = None  # mode dpo: the run it was tuned from

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "mode": self.mode, "attention": self.attention, "precision": self.precision,
                "steps": self.steps, "processes": self.processes, "distributed": self.distributed,
                "epochs": self.epochs, "train_loss": self.train_loss, "eval_loss": self.eval_loss,
                "dataset": self.dataset, "owner": {"id": self.owner_id, "name": self.owner_name},
                "finished": self.finished, "plan": self.plan,
                "memory": {"tokens": self.memory_tokens} if self.memory_tokens else None,
                **({"from": self.from_run} if self.from_run else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunInfo:
        owner = data.get("owner") or {}
        return cls(data.get("base"), data["mode"], data["steps"], data["epochs"], data["train_loss"],
                   data.get("eval_loss"), data.get("dataset", ""), owner.get("id"), owner.get("name"),
                   data.get("attention", "sdpa"), data.get("precision", "fp32"), data.get("processes", 1),
                   data.get("distributed", "no"), data.get("finished", ""), dict(data.get("plan") or {}),
                   (data.get("memory") or {}).get("tokens"), data.get("from"))


class Run:
    """A run directory; `Run.open` checks that it is one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """The run in `path`, finished or not; `RunError` when the folder is missing or holds no run."""
        run = cls(path)
        if not run.path.is_dir():
            raise RunError(f"{run.path}: no such run directory")
        if not run.finished and not (run.path / CONFIG_FILE).is_file():
            raise RunError(f"{run.path} is not a doppel run (no {RUN_FILE}, no {CONFIG_FILE})")
        return run

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def finished(self) -> bool:
        return (self.path / RUN_FILE).is_file()

    @property
    def info(self) -> RunInfo:
        """run.json; `RunError` for a run still training (or stopped before its end)."""
        if not self.finished:
            raise RunError(f"{self.path} is an unfinished run; finish it with doppel train DATA -o {self.path} "
                           "--resume")
        return RunInfo.from_json(json.loads((self.path / RUN_FILE).read_text(encoding="utf-8")))

    def write_info(self, info: RunInfo) -> None:
        """Write run.json last and at once: from then on the run is finished."""
        tmp = self.path / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path / RUN_FILE)

    @property
    def config(self) -> TrainConfig:
        from doppel import config

        return config.load(TrainConfig, self.path / CONFIG_FILE, {})

    @property
    def stats(self) -> DatasetStats | None:
        """The stats of the dataset it trained on (None before training began)."""
        path = self.path / STATS_FILE
        return DatasetStats.read(path) if path.is_file() else None

    @property
    def speakers(self) -> list[str]:
        """Its speakers, most active first."""
        stats = self.stats
        return stats.speaker_names if stats else []

    @property
    def owner(self) -> str | None:
        """The export owner's name, if the dataset knew it."""
        stats = self.stats
        return stats.owner_name if stats else None

    def personas(self) -> list[str]:
        """Who the model can play: the owner first, then the others by activity."""
        stats = self.stats
        if stats is None:
            return []
        owner, speakers = stats.owner_name, stats.speaker_names
        return ([owner] if owner in speakers else []) + [s for s in speakers if s != owner]

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's rows."""
        return read_metrics(self.path / METRICS_FILE)

    @property
    def checkpoints(self) -> list[Path]:
        """The saved checkpoints, oldest first (transformers writes trainer_state.json last)."""
        found = sorted((self.path / CHECKPOINTS).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return [p for p in found if (p / "trainer_state.json").is_file()]

    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint with no damaged file. The damaged ones skipped are named in a warning (by the
        first process: under accelerate launch every process checks the same files); `RunError` when there are
        checkpoints and none is complete."""
        damaged: list[str] = []
        for checkpoint in reversed(self.checkpoints):
            problem = _damage(checkpoint)
            if problem is None:
                if damaged and int(os.environ.get("RANK", "0")) == 0:
                    log.warning("%s; resuming from %s", ", ".join(damaged), checkpoint.name)
                return checkpoint
            damaged.append(f"{checkpoint.name} is damaged ({problem})")
        if damaged:
            raise RunError(f"cannot resume: {', '.join(damaged)}; delete {self.path / CHECKPOINTS} and run the "
                           "same command to start over")
        return None

    def load(self) -> tuple[Any, Any]:
        """(model in eval mode, tokenizer) of the finished run."""
        from doppel import models

        info = self.info
        tokenizer = models.load_tokenizer(str(self.path))
        if info.mode == "full":
            return models.load_model(str(self.path)).eval(), tokenizer
        from peft import PeftModel

        model = models.load_model(info.base)
        models.fit_embeddings(model, tokenizer)
        with models.loading(f"the adapter of {self.path}"):
            return PeftModel.from_pretrained(model, str(self.path)).eval(), tokenizer

    def gguf_files(self) -> dict[str, Path]:
        """The GGUF files of the run's latest `doppel export` (RUN/gguf.json points at it) still there, by
        quantization."""
        pointer = self.path / GGUF_POINTER
        if not pointer.is_file():
            return {}
        try:
            folder = Path(json.loads(pointer.read_text(encoding="utf-8"))["dir"])
            files = json.loads((folder / "export.json").read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # the export was moved or deleted: there is none
        return {kind: folder / name for kind, name in files.items() if (folder / name).is_file()}

    def note_gguf(self, folder: Path) -> None:
        """Note `folder` as the run's latest GGUF export (what `gguf_files` reads)."""
        (self.path / GGUF_POINTER).write_text(json.dumps({"dir": str(folder.resolve())}) + "\n", encoding="utf-8")

    def merge(self, out: Path) -> None:
        """Write the run (LoRA adapter + base, or full weights) as one standalone safetensors model in `out`."""
        from doppel import models

        if out.exists() and any(out.iterdir()):
            raise ModelError(f"{out} is not empty; choose another output directory")
        model, tokenizer = self.load()
        if self.info.mode != "full":
            model = model.merge_and_unload()
        staging = out.with_name(out.name + ".tmp")
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        if out.exists():  # an empty folder the user made
            models.move_into(staging, out)
        else:
            staging.replace(out)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (none when there is no file)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class Loaded:
    """A model ready to talk: from a run, a model directory, or the embedded default."""

    engine: Engine  # what generates: the transformers model (in eval mode) in `TransformersEngine`, or llama.cpp
    tokenizer: Any
    name: str  # the base model's name, or the folder's
    run: Run | None  # None for a model that is not a doppel run

    @property
    def model(self) -> Engine:
        """`engine`, by the name the Python API gave it first (`Conversation(loaded.model, …)` keeps working)."""
        return self.engine

    @property
    def personas(self) -> list[str]:
        """Who it can play (empty: any name, it was not trained on anyone)."""
        return self.run.personas() if self.run else []

    @property
    def owner(self) -> str | None:
        return self.run.owner if self.run else None


ENGINES = ("auto", "transformers", "llama.cpp")
GGUF_PREFERENCE = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "f16", "bf16", "f32")  # the default file of an export


def open_model(path: str | Path | None, engine: str = "auto", gguf: str | Path | None = None) -> Loaded:
    """A finished run, a merged or Hugging Face model directory, a GGUF file, or (None) the embedded model, loaded
    behind an engine (`Loaded.engine`).

    `engine` "transformers" loads the weights into PyTorch (a GGUF dequantized); "llama.cpp" runs `gguf`, else the
    run's GGUF export (`doppel export`) or the GGUF file `path` names; "auto" is llama.cpp when there is such a file
    and llama-cpp-python is installed, transformers otherwise.
    """
    from doppel import models
    from doppel.engines import TransformersEngine

    if engine not in ENGINES:
        raise ModelError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    folder = Path(path) if path is not None else None
    run = find_run(folder) if folder is not None else None
    file = Path(gguf) if gguf is not None else _gguf_of(folder, run)
    if engine == "auto":
        engine = "llama.cpp" if file is not None and llama_cpp_installed() else "transformers"
    if engine == "llama.cpp":
        from doppel.engines import LlamaCppEngine

        if file is None and folder is None:
            # the packaged Q4_1 file runs, but answered unlike the model it is (docs/benchmarks.md): not by default
            raise ModelError("llama.cpp runs the embedded model from a GGUF export of it: give --gguf FILE")
        if file is None:
            raise ModelError(f"{folder} has no GGUF export for llama.cpp; write one with: doppel export {folder} "
                             f"-o DIR --gguf q8_0 (or give --gguf FILE)")
        tokenizer = models.load_tokenizer(None if folder is None else str(folder))
        name = str(file) if run is None else models.base_name(run.info.base)
        return Loaded(LlamaCppEngine(file), tokenizer, name, run)
    if gguf is not None:
        raise ModelError("a GGUF file is run by llama.cpp: use --engine llama.cpp (or auto)")
    if folder is None:
        tokenizer = models.load_tokenizer(None)
        model = models.load_model(None)
        models.fit_embeddings(model, tokenizer)
        return Loaded(TransformersEngine(model.eval()), tokenizer, models.base_name(None), None)
    if run is not None:
        model, tokenizer = run.load()
        return Loaded(TransformersEngine(model), tokenizer, models.base_name(run.info.base), run)
    tokenizer = models.load_tokenizer(str(folder))
    model = models.load_model(str(folder))
    models.fit_embeddings(model, tokenizer)
    return Loaded(TransformersEngine(model.eval()), tokenizer, str(folder), None)


def find_run(folder: Path) -> Run | None:
    """The finished run in `folder`; None for a model directory or a file; `RunError` for a missing path, an
    unfinished run, or a folder that is neither a run nor a model (a dataset given where a run belongs)."""
    if not folder.exists():
        raise RunError(f"{folder}: no such run or model directory")
    if (folder / RUN_FILE).is_file():
        return Run(folder)
    if folder.is_dir():
        if (folder / CHECKPOINTS).is_dir():
            raise RunError(f"{folder} is an unfinished run; finish it with doppel train DATA -o {folder} --resume")
        if not (folder / "config.json").is_file():
            raise RunError(f"{folder} is neither a doppel run nor a model directory (no {RUN_FILE}, no config.json)")
    return None


def _gguf_of(folder: Path | None, run: Run | None) -> Path | None:
    """The GGUF file to run: `folder` itself when it is one, the preferred file of a run's export, or None."""
    from doppel import models

    if folder is not None and models.is_gguf(str(folder)):
        return folder
    if run is None:
        return None
    files = run.gguf_files()
    return next((files[kind] for kind in GGUF_PREFERENCE if kind in files), None)


# --- is a checkpoint whole? ---------------------------------------------------------------------------------

def _damage(checkpoint: Path) -> str | None:
    """Which of a checkpoint's files is cut short or unreadable, if any. Only headers and indexes are read, never
    tensors, so it takes milliseconds even next to a 7B full fine-tune's optimizer state. What it cannot check (the
    shards of FSDP's distributed checkpoints) passes."""
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        problem = _file_damage(path)
        if problem:
            return f"{path.relative_to(checkpoint)} {problem}"
    return None


def _file_damage(path: Path) -> str | None:
    import zipfile

    if path.suffix == ".json":
        try:
            json.loads(path.read_bytes())
        except ValueError:
            return "is not valid JSON"
    elif path.suffix in (".pt", ".pth", ".bin"):
        # torch.save writes a zip archive, whose central directory comes last: a cut-off file has none
        try:
            with zipfile.ZipFile(path):
                pass
        except zipfile.BadZipFile:
            return "is truncated"
    elif path.suffix == ".safetensors":
        return _safetensors_damage(path)
    return None


def _safetensors_damage(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the tensors at the offsets the header
    gives, so the header alone tells the size of the whole."""
    size = path.stat().st_size
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = f.read(min(length, size))
    if 8 + length > size:
        return "is truncated"
    try:
        tensors = json.loads(header)
    except ValueError:
        return "has an unreadable header"
    end = max((t["data_offsets"][1] for name, t in tensors.items() if name != "__metadata__"), default=0)
    return "is truncated" if 8 + length + end > size else None
