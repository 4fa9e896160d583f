"""How a run trains on this machine: resolved once from its config, before anything is written, and recorded
in run.json. Everything `auto` in a `TrainConfig` is decided here and nowhere else."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from doppel.config import TrainConfig
from doppel.errors import TrainError
from doppel.training.attention import VARLEN

# a launcher config's `fsdp_activation_checkpointing: true` reaches accelerate through this variable
FSDP_CHECKPOINTING = "FSDP_ACTIVATION_CHECKPOINTING"


@dataclass(frozen=True)
class Plan:
    device: str  # "cuda" or "cpu"
    precision: str  # "bf16" or "fp32"
    attention: str  # the kernel: varlen, sdpa, eager or flash_attention_2
    rows: int  # per device per micro-batch
    optimizer: str  # transformers' name for it
    checkpointing: bool  # gradient checkpointing (transformers'; see `take_over_fsdp_checkpointing`)
    fsdp_checkpointing: bool  # a launcher config asked accelerate for activation checkpointing

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan(cfg: TrainConfig, parameters: int) -> Plan:
    """The plan for `cfg` here; `parameters`: the base model's size (checkpointing is on over 1B on a GPU).
    Raises `TrainError` for an option whose GPU or package is missing."""
    import torch

    cuda = torch.cuda.is_available()
    check_options(cfg, cuda)
    fsdp = os.environ.get(FSDP_CHECKPOINTING, "").lower() == "true"
    checkpointing = cfg.gradient_checkpointing == "on" or (
        cfg.gradient_checkpointing == "auto" and (fsdp or (cuda and parameters > 1e9)))
    optimizer = {"adamw_8bit": "adamw_bnb_8bit", "adamw": "adamw_torch_fused" if cuda else "adamw_torch",
                 "auto": "adamw_torch_fused" if cuda else "adamw_torch"}[cfg.optim]
    return Plan("cuda" if cuda else "cpu", "bf16" if uses_bf16(cfg, cuda) else "fp32", attention_kernel(cfg, cuda),
                cfg.batch_size or default_rows(cuda), optimizer, checkpointing, fsdp)


def take_over_fsdp_checkpointing(plan: Plan) -> None:
    """accelerate's own activation checkpointing (asked for by a launcher config) wraps each layer in a
    CheckpointWrapper, whose extra module level hides the LoRA weights from peft's save: the adapter would be
    written empty. transformers' checkpointing does the same work without the wrapper, so it takes over: the plan
    has it on, and accelerate is told, through its environment, not to do it too. The one change doppel makes to
    the process's state, before the trainer reads it."""
    if plan.fsdp_checkpointing:
        os.environ[FSDP_CHECKPOINTING] = "false"


def default_rows(cuda: bool) -> int:
    """Rows per micro-batch when none is given. 8 rows of 1024 tokens keep a GPU busy; two CPU cores train
    about 1.36x faster per token on one row of 1024 than on two (docs/benchmarks.md)."""
    return 8 if cuda else 1


def uses_bf16(cfg: TrainConfig, cuda: bool) -> bool:
    """Whether a run computes in bf16: `cfg.precision`, with auto resolved for this machine."""
    import torch

    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    return torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere PyTorch emulates bf16 and
    training in it is no faster than fp32; with it, a training step of the embedded model takes about two thirds
    of the fp32 time (docs/benchmarks.md)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up with care
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def attention_kernel(cfg: TrainConfig, cuda: bool) -> str:
    """The attention implementation a run uses: `cfg.attention`, with auto resolved for this machine."""
    if cfg.attention != "auto":
        return cfg.attention
    if not cuda:
        return VARLEN
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


# what an option needs: a GPU, and the package to pip install with the modules any of which will do
NEEDS = {"mode qlora": (False, "bitsandbytes", ("bitsandbytes",)),
         "optim adamw_8bit": (False, "bitsandbytes", ("bitsandbytes",)),
         "liger": (True, "liger-kernel", ("liger_kernel",)),
         "attention flash_attention_2": (True, "flash-attn", ("flash_attn",)),
         "report_to tensorboard": (False, "tensorboard", ("tensorboard", "tensorboardX")),
         "report_to wandb": (False, "wandb", ("wandb",)),
         "report_to trackio": (False, "trackio", ("trackio",))}


def check_options(cfg: TrainConfig, cuda: bool) -> None:
    """Refuse, before anything is written, the options this run cannot use here."""
    chosen = {"mode qlora": cfg.mode == "qlora", "optim adamw_8bit": cfg.optim == "adamw_8bit",
              "liger": cfg.liger, "attention flash_attention_2": cfg.attention == "flash_attention_2",
              **{f"report_to {name}": True for name in cfg.report_to}}
    if cfg.mode == "qlora" and cfg.model is None:
        raise TrainError("mode qlora needs a model in Hugging Face format: the embedded model is GGUF, which "
                         "transformers loads only dequantized; use mode lora for it")
    for option in (option for option, on in chosen.items() if on):
        gpu, package, modules = NEEDS[option]
        if gpu and not cuda:
            raise TrainError(f"{option} needs an NVIDIA GPU")
        if not any(importlib.util.find_spec(module) for module in modules):
            raise TrainError(f"{option} needs the {package} package, which is not installed: pip install {package}")


def out_of_memory(cfg: TrainConfig, plan: Plan, loaded: bool, kept: Path | None) -> str:
    """What to say when the GPU runs out of memory: the options that need less of it. `loaded`: whether the model
    itself fitted; `kept`: the checkpoints' folder when there are some."""
    smaller = {"full": "mode lora or mode qlora, or more GPUs (configs/fsdp.yaml)", "lora": "mode qlora",
               "qlora": "a smaller model"}[cfg.mode]
    if not loaded:
        return f"out of GPU memory loading the model; try {smaller}"
    rows = plan.rows
    hints = [f"batch_size {rows // 2} with gradient_accumulation {cfg.gradient_accumulation * 2} (the same steps)"
             if rows > 1 else f"max_length {cfg.max_length // 2}"]
    hints += ["gradient_checkpointing on"] * (not plan.checkpointing) + [smaller]
    said = f"out of GPU memory with {rows} × {cfg.max_length}-token rows per micro-batch; try {', '.join(hints)}"
    return said + (f"; the checkpoints so far are kept in {kept}, resume goes on from the last" if kept else "")
