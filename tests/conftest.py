"""Shared helpers: small exports written in Telegram Desktop's exact byte format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from doppel.readers.synthetic import message, write_export

ME, MAX, ANN = 100, 201, 202
T0 = 1_700_000_000


def msg(mid: int, ts: int, who: int, text: Any = "hi", name: str | None = None, **extra: Any) -> dict:
    default = {ME: "Me Owner", MAX: "Max Orlov", ANN: "Ann Lee"}.get(who, f"User {who}")
    return message(mid, T0 + ts, who, name if name is not None else default, text, **extra)


def full_export(chats: list[dict], owner: int | None = ME, left: list[dict] | None = None) -> dict:
    out: dict[str, Any] = {"about": "Here is the data you requested."}
    if owner is not None:
        out["personal_information"] = {"user_id": owner, "first_name": "Me", "last_name": "Owner"}
    out["chats"] = {"about": "chats", "list": chats}
    if left is not None:
        out["left_chats"] = {"about": "left", "list": left}
    return out


def personal(peer: int, messages: list[dict], name: str | None = "Max") -> dict:
    return {"name": name, "type": "personal_chat", "id": peer, "messages": messages}


def dialogue(peer: int = MAX, start: int = 0, first_id: int = 1) -> list[dict]:
    """A two-turn exchange: peer says two messages, the owner answers."""
    return [msg(first_id, start, peer, "yo"), msg(first_id + 1, start + 10, peer, "gym later?"),
            msg(first_id + 2, start + 30, ME, "го))")]


@pytest.fixture
def write(tmp_path: Path):
    def _write(export: dict, name: str = "result.json") -> Path:
        return write_export(tmp_path / name, export)
    return _write


@pytest.fixture
def sample() -> Path:
    return Path(__file__).parent.parent / "examples" / "sample_export" / "result.json"


def sentencepiece_tokenizer() -> Any:
    """A Llama-style tokenizer (Metaspace word-start markers, byte fallback), without ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    corpus = ["yo gym later? ok see you Bye! Max Orlov Lena Volkova >>> го)) в 7\n🙂"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    # the trainer learns characters, not byte tokens: Llama's 256 `<0xNN>` pieces are added to the vocabulary, so
    # that a character the corpus lacks falls back to its bytes (not to `<unk>`) and any text decodes back
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{i:02X}>": len(vocab) + i for i in range(256)})
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def tiny_model(folder: Path, tokenizer: Any, seed: int = 0, hidden: int = 32) -> Path:
    """A randomly initialised two-layer Llama with `tokenizer`, saved like a Hugging Face model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    """The embedded model's tokenizer (on a GPU machine without the embedded package: the same one saved where
    DOPPEL_RANDOM_TOKENIZER says, see benchmarks/gpu.sh)."""
    import os

    from doppel.models import load_tokenizer

    return load_tokenizer(os.environ.get("DOPPEL_RANDOM_TOKENIZER"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> Path:
    """A tiny random model with SmolLM2's real tokenizer."""
    return tiny_model(tmp_path_factory.mktemp("tiny"), smollm2_tokenizer)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample export, prepared."""
    from doppel.config import PrepareConfig
    from doppel.preparing import pipeline

    out = tmp_path_factory.mktemp("sample") / "data"
    pipeline.prepare(Path(__file__).parent.parent / "examples" / "sample_export" / "result.json", out,
                    PrepareConfig())
    return out


@pytest.fixture(scope="session")
def memorised(tmp_path_factory, tiny):
    """A tiny model trained until it knows its three identical sessions by heart."""
    from doppel.config import PrepareConfig, TrainConfig
    from doppel.preparing import pipeline
    from doppel.training.train import train

    folder = tmp_path_factory.mktemp("memorised")
    talk = []
    for i, start in enumerate((0, 7200, 14400)):
        talk += [msg(10 * i + 1, start, MAX, "yo"), msg(10 * i + 2, start + 5, MAX, "gym later?"),
                 msg(10 * i + 3, start + 30, ME, "го))"), msg(10 * i + 4, start + 35, ME, "в 7 🙂")]
    export = write_export(folder / "result.json", full_export([personal(MAX, talk)]))
    pipeline.prepare(export, folder / "data", PrepareConfig(eval_fraction=0))
    train(folder / "data", folder / "run", TrainConfig(model=str(tiny), mode="full", max_steps=60, learning_rate=1e-2,
                                                       warmup=0, lr_scheduler="constant_with_warmup", max_length=256,
                                                       batch_size=2, logging_steps=20, save_steps=1000))
    return folder / "run"


def refused(path: Path, tmp_path: Path, line: str) -> None:
    """`doppel prepare PATH` prints exactly `line` (after `doppel: error: `), exits 2 and writes nothing."""
    from click.testing import CliRunner

    from doppel.cli import main

    result = CliRunner().invoke(main, ["prepare", str(path), "-o", str(tmp_path / "data")], catch_exceptions=False)
    assert (result.exit_code, result.output) == (2, f"doppel: error: {line}\n")
    assert not (tmp_path / "data").exists()


def traced(work: Any) -> tuple[Any, int]:
    """`work()`'s result and the peak of Python's traced allocations while it ran, in bytes."""
    import tracemalloc

    tracemalloc.start()
    try:
        return work(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
