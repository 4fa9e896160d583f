"""doppel: turn a chat export into a model that writes like you and the people you talk to most.

The library under the `doppel` command, one call per stage:

    from doppel import prepare, PrepareConfig, train, TrainConfig, Run, Conversation, Sampling, evaluate
    stats = prepare("result.json", "data", PrepareConfig())
    info = train("data", "run", TrainConfig(max_steps=30))
    model, tokenizer = Run.open("run").load()
    print(list(Conversation(model, tokenizer, "Lena Volkova", "Max Orlov").reply(["hey"])))

Names are imported on first use, so `import doppel` (and `doppel --help`) stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from doppel.config import EvalConfig, PrepareConfig, Sampling, ServeConfig, TrainConfig
    from doppel.dataset import Dataset, DatasetStats
    from doppel.errors import DoppelError
    from doppel.evaluation.evaluate import evaluate
    from doppel.preparing.pipeline import prepare
    from doppel.records import Session, Turn
    from doppel.run import Run, RunInfo, open_model
    from doppel.serving.chat import Conversation, Reply, open_memory
    from doppel.serving.server import create_app
    from doppel.training.train import train

_HOMES = {
    "prepare": "doppel.preparing.pipeline", "train": "doppel.training.train", "evaluate": "doppel.evaluation.evaluate",
    "create_app": "doppel.serving.server", "Conversation": "doppel.serving.chat", "Reply": "doppel.serving.chat",
    "open_memory": "doppel.serving.chat",
    "Run": "doppel.run", "RunInfo": "doppel.run", "open_model": "doppel.run", "Dataset": "doppel.dataset",
    "DatasetStats": "doppel.dataset", "Session": "doppel.records", "Turn": "doppel.records",
    "DoppelError": "doppel.errors", **{name: "doppel.config" for name in (
        "PrepareConfig", "TrainConfig", "EvalConfig", "Sampling", "ServeConfig")},
}
__all__ = ["Conversation", "Dataset", "DatasetStats", "DoppelError", "EvalConfig", "PrepareConfig", "Reply", "Run",
           "RunInfo", "Sampling", "ServeConfig", "Session", "TrainConfig", "Turn", "create_app", "evaluate",
           "open_memory", "open_model", "prepare", "train"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'doppel' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
