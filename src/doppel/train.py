"""`train(cfg)`: fine-tune a chat model on a sessions dataset with TRL's SFTTrainer.

One linear function for every setup: CPU, one GPU, or many under `accelerate launch` with FSDP.
LoRA, QLoRA and full fine-tuning differ only where the model is prepared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from doppel import config
from doppel.attention import VARLEN
from doppel.config import ConfigError, knob

CHECKPOINTS = "checkpoints"
TOKENS = "tokens"

log = logging.getLogger(__name__)


class TrainError(Exception):
    """The run cannot start or continue; the message is shown to the user as is."""


@dataclass(frozen=True)
class TrainConfig:
    model: str | None = knob(None, "base model: Hugging Face id or local path (default: embedded SmolLM2-135M)")
    mode: Literal["lora", "qlora", "full"] = knob("lora", "lora, qlora (4-bit NF4 base, bitsandbytes) or full")
    max_length: int = knob(1024, "tokens per training row; longer sessions are split at turn boundaries")
    packing: bool = knob(True, "pack short sessions into full rows (they never attend to each other)")
    batch_size: int | None = knob(None, "rows per device per micro-batch (default: 8 on a GPU; 1 on CPU, where "
                                  "micro-batches of about a thousand tokens train fastest)")
    gradient_accumulation: int = knob(1, "micro-batches per optimizer step")
    epochs: float = knob(3.0, "passes over the training sessions")
    max_steps: int | None = knob(None, "stop after this many optimizer steps (overrides epochs)")
    learning_rate: float | None = knob(None, "peak learning rate (default: 2e-4 lora/qlora, 2e-5 full)")
    warmup: float = knob(0.03, "share of the steps spent warming up the learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = knob("cosine", "learning-rate schedule")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    lora_r: int = knob(16, "LoRA rank")
    lora_alpha: int = knob(32, "LoRA scaling numerator (alpha / r scales the update)")
    lora_dropout: float = knob(0.05, "dropout on the LoRA input")
    gradient_checkpointing: Literal["auto", "on", "off"] = knob(
        "auto", "recompute activations to save memory (auto: on for models over 1B parameters on GPU)")
    precision: Literal["auto", "bf16", "fp32"] = knob(
        "auto", "auto: bf16 where the hardware computes it natively (a GPU with bf16, a CPU with AVX512-BF16 or "
        "AMX), else fp32")
    attention: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2"] = knob(
        "auto", "attention kernel (auto: flash_attention_2 when installed on CUDA, else sdpa on CUDA, varlen on "
        "CPU; varlen: each packed session's attention alone, see doppel/attention.py)")
    liger: bool = knob(False, "fused Liger kernels (RMSNorm, SwiGLU, RoPE; CUDA, liger-kernel installed)")
    optim: Literal["auto", "adamw", "adamw_8bit"] = knob(
        "auto", "optimizer (auto: fused AdamW on GPU; adamw_8bit halves a full fine-tune's optimizer memory)")
    save_steps: int = knob(200, "save a checkpoint every this many steps")
    save_total_limit: int = knob(2, "keep only this many recent checkpoints")
    eval_steps: int | None = knob(None, "held-out loss every this many steps (default: save_steps)")
    logging_steps: int = knob(10, "log loss and tokens/s every this many steps")
    seed: int = knob(42, "random seed (data order, LoRA init)")
    resume: bool = knob(False, "continue the run in the output directory from its last checkpoint")
    report_to: tuple[str, ...] = knob((), "also log to: tensorboard, trackio, wandb (repeatable)")

    def __post_init__(self) -> None:
        positive = ("max_length", "batch_size", "gradient_accumulation", "lora_r", "lora_alpha",
                    "save_steps", "logging_steps", "save_total_limit")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_length < 32:
            raise ConfigError(f"max_length must be at least 32 tokens, got {self.max_length}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if self.learning_rate is not None and not 0 < self.learning_rate < 1:
            raise ConfigError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.warmup < 1 or not 0 <= self.lora_dropout < 1:
            raise ConfigError("warmup and lora_dropout must be in [0, 1)")
        unknown = set(self.report_to) - {"tensorboard", "trackio", "wandb"}
        if unknown:
            raise ConfigError(f"report_to: unknown {sorted(unknown)[0]!r}; use tensorboard, trackio or wandb")

    @property
    def lr(self) -> float:
        return self.learning_rate or (2e-5 if self.mode == "full" else 2e-4)


def train(dataset_dir: Path, run_dir: Path, cfg: TrainConfig, callbacks: Sequence[Any] = (),
          save: bool = True) -> dict[str, Any]:
    """Train, save the adapter or weights with the tokenizer in `run_dir`, and return run.json's content.

    `save=False` (benchmarks) skips the final weights; the run is then not marked finished.
    """
    import torch

    stats = _check_dataset(dataset_dir)
    checkpoint = _check_run(run_dir, cfg.resume)
    cuda = torch.cuda.is_available()
    _check_options(cfg, cuda)
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size or default_rows(cuda))
    fresh = not (run_dir.exists() and any(run_dir.iterdir()))
    facts: dict[str, Any] = {}  # what _train has settled, for the error message
    try:
        return _train(dataset_dir, run_dir, cfg, cuda, stats, checkpoint, callbacks, save, facts)
    except BaseException as exc:
        kept = _checkpoints(run_dir)
        if fresh and not kept and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth resuming: the same command can run again
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise TrainError(_out_of_memory(cfg, facts.get("checkpointing"), run_dir if kept else None)) from None
        raise


def _train(dataset_dir: Path, run_dir: Path, cfg: TrainConfig, cuda: bool, stats: dict[str, Any],
           checkpoint: Path | None, callbacks: Sequence[Any], save: bool, facts: dict[str, Any]) -> dict[str, Any]:
    from peft.helpers import disable_input_dtype_casting
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from doppel import metrics, models, packing
    from doppel.dataset import STATS_FILE
    from doppel.loss import Trainer

    set_seed(cfg.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    args = _arguments(cfg, run_dir, cuda)
    with args.main_process_first(desc="tokenizing"):
        run_dir.mkdir(parents=True, exist_ok=True)
        config.dump(cfg, run_dir / "config.yaml")
        shutil.copyfile(dataset_dir / STATS_FILE, run_dir / "dataset_stats.json")
        data = {split: packing.rows(packing.cached(
            run_dir / TOKENS / split, lambda s=split: packing.tokenized(dataset_dir, s, tokenizer, cfg.max_length)),
            cfg.max_length, cfg.packing) for split in ("train", "eval")}
    if checkpoint is not None:
        metrics.truncate(run_dir / metrics.METRICS_FILE, int(checkpoint.name.split("-")[-1]))
    elif args.process_index == 0:
        (run_dir / metrics.METRICS_FILE).write_text("", encoding="utf-8")
    attention = attention_kernel(cfg, cuda)
    model = _model(cfg, tokenizer, attention, cuda, args)
    facts["checkpointing"] = args.gradient_checkpointing
    if not len(data["eval"]):
        args.eval_strategy = "no"
    collator = packing.Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                else tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                flatten=attention.startswith("flash_attention") or attention == VARLEN)
    # on CPU the loss projects only the target positions (doppel/loss.py); on a GPU it is TRL's fused LM head
    trainer = Trainer(model=model, args=args, train_dataset=data["train"],
                      eval_dataset=data["eval"] if len(data["eval"]) else None,
                      processing_class=tokenizer, data_collator=collator, compact_loss=not cuda)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(metrics.TrainLog(run_dir / metrics.METRICS_FILE, collator, args.world_size,
                                      cfg.gradient_accumulation))
    if trainer.is_fsdp_enabled:
        from doppel.fsdp import CompleteForwardsAfterEval

        trainer.add_callback(CompleteForwardsAfterEval())
    for callback in callbacks:
        trainer.add_callback(callback)
    # bf16 on CPU: peft casts each adapter's input up to the adapter's fp32, and autocast casts it straight back
    # down for the matmul; without the round trip a step takes 4% less time and the losses move by about 0.1%
    # (docs/benchmarks.md). Not measured on a GPU yet, so not done there.
    with disable_input_dtype_casting(model, active=args.bf16 and not cuda):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    logged = metrics.read(run_dir / metrics.METRICS_FILE)
    # the whole run's mean (transformers' own counts only this process's steps); an older run's log cannot say
    train_loss = metrics.train_loss(logged) or result.training_loss
    info = {"base": cfg.model, "mode": cfg.mode, "attention": attention, "precision": "bf16" if args.bf16 else "fp32",
            "steps": trainer.state.global_step, "processes": args.world_size,
            "distributed": str(trainer.accelerator.distributed_type).split(".")[-1].lower(),
            "epochs": round(trainer.state.epoch or 0.0, 4), "train_loss": train_loss,
            "eval_loss": next((r["eval_loss"] for r in reversed(logged) if "eval_loss" in r), None),
            "dataset": str(dataset_dir.resolve()), "owner": stats.get("owner"),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if save:
        _save(trainer, tokenizer, run_dir, info)
    return info


def default_rows(cuda: bool) -> int:
    """Rows per micro-batch when none is given. 8 rows of 1024 tokens keep a GPU busy; two CPU cores train
    about 1.36x faster per token on one row of 1024 than on two (docs/benchmarks.md)."""
    return 8 if cuda else 1


def _check_dataset(dataset_dir: Path) -> dict[str, Any]:
    from doppel.dataset import STATS_FILE, TRAIN_FILE

    stats_path = dataset_dir / STATS_FILE
    if not stats_path.is_file():
        raise TrainError(f"{dataset_dir} is not a doppel dataset (no {STATS_FILE}); run doppel prepare first")
    stats: dict[str, Any] = json.loads(stats_path.read_text(encoding="utf-8"))
    if not stats.get("sessions", {}).get("train") or not (dataset_dir / TRAIN_FILE).is_file():
        raise TrainError(f"{dataset_dir} has no training sessions; check doppel inspect {dataset_dir}")
    return stats


def _check_run(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuses to overwrite anything."""
    from doppel.models import RUN_FILE

    if (run_dir / RUN_FILE).is_file():
        raise TrainError(f"{run_dir} already holds a finished run; choose another --out")
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise TrainError(f"{run_dir} is not empty; add --resume to continue the run there, "
                             "or choose another --out")
        return None
    return _last_complete(run_dir)


def _last_complete(run_dir: Path) -> Path | None:
    """The newest checkpoint with no damaged file. The damaged ones skipped are named in a warning (by the first
    process: under accelerate launch every process checks the same files)."""
    damaged: list[str] = []
    for checkpoint in reversed(_checkpoints(run_dir)):
        problem = _damage(checkpoint)
        if problem is None:
            if damaged and int(os.environ.get("RANK", "0")) == 0:
                log.warning("%s; resuming from %s", ", ".join(damaged), checkpoint.name)
            return checkpoint
        damaged.append(f"{checkpoint.name} is damaged ({problem})")
    if damaged:
        raise TrainError(f"cannot resume: {', '.join(damaged)}; delete {run_dir / CHECKPOINTS} and run the same "
                         "command to start over")
    return None


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's saved checkpoints, oldest first (transformers writes trainer_state.json last)."""
    found = sorted((run_dir / CHECKPOINTS).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return [p for p in found if (p / "trainer_state.json").is_file()]


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


# what an option needs: a GPU, and the package to pip install with the modules any of which will do
NEEDS = {"--mode qlora": (False, "bitsandbytes", ("bitsandbytes",)),
         "--optim adamw_8bit": (False, "bitsandbytes", ("bitsandbytes",)),
         "--liger": (True, "liger-kernel", ("liger_kernel",)),
         "--attention flash_attention_2": (True, "flash-attn", ("flash_attn",)),
         "--report-to tensorboard": (False, "tensorboard", ("tensorboard", "tensorboardX")),
         "--report-to wandb": (False, "wandb", ("wandb",)),
         "--report-to trackio": (False, "trackio", ("trackio",))}


def _check_options(cfg: TrainConfig, cuda: bool) -> None:
    """Refuse, before anything is written, the options this run cannot use here."""
    import importlib.util

    chosen = {"--mode qlora": cfg.mode == "qlora", "--optim adamw_8bit": cfg.optim == "adamw_8bit",
              "--liger": cfg.liger, "--attention flash_attention_2": cfg.attention == "flash_attention_2",
              **{f"--report-to {name}": True for name in cfg.report_to}}
    if cfg.mode == "qlora" and cfg.model is None:
        raise TrainError("--mode qlora needs a --model in Hugging Face format: the embedded model is GGUF, which "
                         "transformers loads only dequantized; use --mode lora for it")
    for option in (option for option, on in chosen.items() if on):
        gpu, package, modules = NEEDS[option]
        if gpu and not cuda:
            raise TrainError(f"{option} needs an NVIDIA GPU")
        if not any(importlib.util.find_spec(module) for module in modules):
            raise TrainError(f"{option} needs the {package} package, which is not installed: pip install {package}")


def _out_of_memory(cfg: TrainConfig, checkpointing: bool | None, kept: Path | None) -> str:
    """What to say when the GPU runs out of memory: the options that need less of it. `checkpointing` is
    None when the model itself did not fit."""
    smaller = {"full": "--mode lora or --mode qlora, or more GPUs (configs/fsdp.yaml)", "lora": "--mode qlora",
               "qlora": "a smaller --model"}[cfg.mode]
    if checkpointing is None:
        return f"out of GPU memory loading the model; try {smaller}"
    rows = cfg.batch_size or default_rows(True)
    hints = [f"--batch-size {rows // 2} --gradient-accumulation {cfg.gradient_accumulation * 2} (the same steps)"
             if rows > 1 else f"--max-length {cfg.max_length // 2}"]
    hints += ["--gradient-checkpointing on"] * (not checkpointing) + [smaller]
    said = f"out of GPU memory with {rows} × {cfg.max_length}-token rows per micro-batch; try {', '.join(hints)}"
    return said + (f"; the checkpoints so far are kept in {kept / CHECKPOINTS}, --resume goes on from the last"
                   if kept else "")


def _arguments(cfg: TrainConfig, run_dir: Path, cuda: bool) -> Any:
    from trl import SFTConfig

    bf16 = uses_bf16(cfg, cuda)
    rows = cfg.batch_size or default_rows(cuda)
    return SFTConfig(
        output_dir=str(run_dir / CHECKPOINTS), per_device_train_batch_size=rows, per_device_eval_batch_size=rows,
        gradient_accumulation_steps=cfg.gradient_accumulation, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay, bf16=bf16, seed=cfg.seed,
        logging_steps=cfg.logging_steps, logging_first_step=True, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, eval_strategy="steps", eval_steps=cfg.eval_steps or cfg.save_steps,
        report_to=list(cfg.report_to) or "none", disable_tqdm=True, use_liger_kernel=cfg.liger,
        # without packing, batches of similar lengths waste less on padding
        train_sampling_strategy="random" if cfg.packing else "group_by_length",
        activation_checkpointing=False, activation_checkpointing_kwargs={"use_reentrant": False},
        max_length=cfg.max_length, packing=False, remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=not cuda,
        optim={"adamw_8bit": "adamw_bnb_8bit", "adamw": "adamw_torch_fused" if cuda else "adamw_torch",
               "auto": "adamw_torch_fused" if cuda else "adamw_torch"}[cfg.optim])


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
    import importlib.util

    if not cuda:
        return VARLEN
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def _model(cfg: TrainConfig, tokenizer: Any, attention: str, cuda: bool, args: Any) -> Any:
    """The base model prepared for the mode: LoRA adapters, 4-bit base + adapters, or all weights."""
    import torch

    from doppel import models

    # bf16 weights as TRL stores them: the frozen base of lora/qlora, and on a GPU every weight of a full
    # fine-tune (to fit; AdamW's small updates are then rounded to bf16). A full fine-tune on CPU keeps fp32
    # weights and computes in bf16 under autocast.
    dtype = torch.bfloat16 if args.bf16 and (cuda or cfg.mode != "full") else torch.float32
    model = models.load_model(cfg.model, dtype=dtype, attention=attention, quantize_4bit=cfg.mode == "qlora",
                              device_map={"": args.local_process_index} if cfg.mode == "qlora" and cuda else None)
    new_tokens = models.fit_embeddings(model, tokenizer)
    model.config.use_cache = False
    big = model.num_parameters() > 1e9
    # accelerate's own activation checkpointing (fsdp_activation_checkpointing in a launcher config) wraps each
    # layer in a CheckpointWrapper, whose extra module level hides the LoRA weights from peft's save: the adapter
    # would be written empty. transformers' checkpointing does the same work without the wrapper, so it takes over.
    fsdp_checkpoints = os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true"
    if fsdp_checkpoints:
        os.environ["FSDP_ACTIVATION_CHECKPOINTING"] = "false"
    # TRL reads the old name, transformers the new one
    args.activation_checkpointing = args.gradient_checkpointing = cfg.gradient_checkpointing == "on" or (
        cfg.gradient_checkpointing == "auto" and (fsdp_checkpoints or (cuda and big)))
    if cfg.mode == "full":
        return model
    from peft import LoraConfig, get_peft_model

    # QLoRA: no peft.prepare_model_for_kbit_training. It casts the embeddings, the LM head and the norms to fp32,
    # which makes the whole residual stream fp32 and doubles the activations that checkpointing keeps; TRL dropped
    # that cast after finding the same losses with less memory (huggingface/trl#4457). The rest of it (freezing the
    # base, input gradients for checkpointing) get_peft_model and the trainer do, as for LoRA.
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM",
                      # added ChatML tokens start untrained, so the embeddings and the head train too (peft's
                      # trainable_token_indices would be lighter, but TRL's fused LM head reads the unwrapped weight)
                      modules_to_save=["embed_tokens", "lm_head"] if new_tokens else None,
                      ensure_weight_tying=bool(new_tokens) and bool(model.config.tie_word_embeddings))
    return get_peft_model(model, lora)


def _save(trainer: Any, tokenizer: Any, run_dir: Path, info: dict[str, Any]) -> None:
    """Final weights into the run dir; `run.json`, written last, marks the run finished."""
    from doppel.models import RUN_FILE, move_into

    staging = run_dir / ".final"
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(staging))
        move_into(staging, run_dir)
        tmp = run_dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        tmp.replace(run_dir / RUN_FILE)
    trainer.accelerator.wait_for_everyone()
