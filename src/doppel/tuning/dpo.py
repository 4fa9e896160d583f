"""`train_dpo(cfg)`: `doppel train DATA -o RUN2 --from RUN --mode dpo`, preference tuning on the run's own turns.

DITTO (Shaikh et al., ICLR 2025) in doppel's terms: the finished LoRA run RUN writes its own version of trained
turns of the training split (tuning/preferences.py, RUN2/preferences.jsonl), each real turn is preferred over
the generated one, and TRL's `DPOTrainer` trains a new LoRA adapter on RUN's model with its adapter merged in, so
that the model with the new adapter switched off is exactly RUN: the DPO reference, with no second copy. The
owner's corrections (`--feedback`, feedback.py) are pairs too, each counted `FEEDBACK_WEIGHT` times.

The pairs are doppel's own token ids (render.py), so TRL's tokenization is skipped (`_pair_trainer`); its collator
and loss are used as they are. RUN2 is saved as a normal LoRA run of the base model: the two adapters stacked into
one of rank r1 + r2 (`stack`: B1·A1·s1 + B2·A2·s2 is the product of the concatenated matrices, exactly), so chat,
eval, merge and export read it as any run; run.json says `"mode": "dpo"` and `"from"`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doppel import config
from doppel.config import TrainConfig
from doppel.dataset import STATS_FILE
from doppel.errors import RunError, TrainError
from doppel.run import CHECKPOINTS, CONFIG_FILE, METRICS_FILE, Run, RunInfo
from doppel.run import STATS_FILE as RUN_STATS_FILE
from doppel.tuning import preferences

FEEDBACK_WEIGHT = 3  # an owner's correction says what is wrong for sure: it counts as three generated pairs
ADAPTER, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# taken from the --from run: how its prompts were rendered (rows, memory) and what model it is
INHERITED = ("model", "max_length", "memory", "memory_tokens", "precision", "attention")


def train_dpo(dataset_dir: str | Path, run_dir: str | Path, cfg: TrainConfig,
              progress: Callable[[int, int], None] = lambda done, total: None, callbacks: Sequence[Any] = ()
              ) -> RunInfo:
    """Generate the pairs (resumable), train the preference adapter, and save RUN2 as a finished run."""
    from transformers import set_seed

    from doppel import models
    from doppel.training import packing
    from doppel.training.plan import plan
    from doppel.training.train import _dataset, _memory, _start

    dataset = _dataset(Path(dataset_dir))
    source = _source(cfg)
    run = Run(run_dir)
    checkpoint, _ = _start(run, cfg)
    # planned as a LoRA run; the pairs are not packed, so the attention is the model's own (sdpa), not varlen
    how = dataclasses.replace(plan(dataclasses.replace(cfg, mode="lora", from_run=None, pairs=None, feedback=None),
                                   models.parameter_count(cfg.model)), attention="sdpa")
    if cfg.feedback is not None and not cfg.feedback.is_file():
        raise TrainError(f"{cfg.feedback}: no such feedback file")
    sessions = {s.id: s for s in dataset.sessions("train")}  # never the held-out split
    preferences.read(run.path / preferences.PREFERENCES_FILE, sessions)  # a bad line is refused before the model loads
    set_seed(cfg.seed)
    model, tokenizer = source.load()
    memory = _memory(cfg, dataset)
    run.path.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, run.path / CONFIG_FILE)
    shutil.copyfile(dataset.path / STATS_FILE, run.path / RUN_STATS_FILE)
    chosen = preferences.contexts(list(sessions.values()), cfg.pairs, cfg.seed)
    picked = list({s.id: s for s, _ in chosen}.values())
    blocks = dict(zip((s.id for s in picked),
                      packing.memory_blocks(picked, "train", tokenizer, memory, cfg.memory_budget), strict=True))
    pairs = preferences.make(run.path / preferences.PREFERENCES_FILE, model, tokenizer, chosen, sessions, blocks,
                             cfg.max_length, cfg.seed, progress)
    rows = preferences.rendered(pairs, sessions, blocks, tokenizer, cfg.max_length)
    if cfg.feedback is not None:
        from doppel.serving.chat import open_memory

        recall = open_memory(source) if memory is not None else None
        rows += FEEDBACK_WEIGHT * preferences.feedback_pairs(cfg.feedback, tokenizer, recall, cfg.max_length)
    if not rows:
        raise TrainError(f"no pairs to learn from: {len(pairs)} turns generated, every one the same as the real "
                         "turn; give more --pairs")
    trainer = _trainer(cfg, how, model, tokenizer, rows, run.path, callbacks)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    from doppel.training import metrics

    stats = dataset.stats
    info = RunInfo(cfg.model, "dpo", trainer.state.global_step, round(trainer.state.epoch or 0.0, 4),
                   metrics.train_loss(run.metrics()) or result.training_loss, None, str(dataset.path.resolve()),
                   stats.owner_id, stats.owner_name, "sdpa", how.precision, trainer.args.world_size,
                   str(trainer.accelerator.distributed_type).split(".")[-1].lower(),
                   time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   {**how.to_json(), "pairs": len(rows), "generated": len(pairs)},
                   cfg.memory_budget if memory else None, str(source.path.resolve()))
    _save(trainer, tokenizer, source, run, info)
    return info


def dpo_config(config_file: Path | None, given: dict[str, Any], cfg: TrainConfig) -> TrainConfig:
    """`cfg` with what shapes the prompts and the model taken from the --from run's config (`INHERITED`), unless the
    config file or a flag gives it: the pairs are rendered as that run was trained. The training budget and rate
    are the preference step's own."""
    import yaml

    assert cfg.from_run is not None
    saved = cfg.from_run / CONFIG_FILE
    if not saved.is_file():
        raise TrainError(f"--from {cfg.from_run}: not a doppel run (no {CONFIG_FILE})")
    source = config.load(TrainConfig, saved, {})
    in_file = set()
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        in_file = {str(k).replace("-", "_") for k in loaded} if isinstance(loaded, dict) else set()
    inherited = {k: getattr(source, k) for k in INHERITED if k not in in_file}
    return config.load(TrainConfig, config_file, {**inherited, **given})


def _source(cfg: TrainConfig) -> Run:
    """The finished LoRA run that `from_run` names."""
    assert cfg.from_run is not None  # TrainConfig refuses mode dpo without it
    try:
        source = Run.open(cfg.from_run)
        info = source.info
    except RunError as exc:
        raise TrainError(f"--from: {exc}") from None
    if info.mode not in ("lora", "dpo"):
        raise TrainError(f"--from {cfg.from_run} is a {info.mode} run; the preference step stacks a LoRA adapter on a "
                         "lora run's (train one with --mode lora)")
    return source


def _trainer(cfg: TrainConfig, how: Any, model: Any, tokenizer: Any, rows: list[preferences.Rendered], run_dir: Path,
             callbacks: Sequence[Any]) -> Any:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig

    from doppel.render import IM_END
    from doppel.training import metrics

    merged = model.merge_and_unload()  # the reference: RUN's own model, adapter folded into the weights
    if how.bf16:  # the frozen weights as LoRA training keeps them (training/train.py)
        merged = merged.to(torch.bfloat16)
    merged.config.use_cache = False
    policy = get_peft_model(merged, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                               target_modules="all-linear", task_type="CAUSAL_LM"))
    args = DPOConfig(
        output_dir=str(run_dir / CHECKPOINTS), per_device_train_batch_size=how.rows,
        gradient_accumulation_steps=cfg.gradient_accumulation, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay, bf16=how.bf16, seed=cfg.seed,
        logging_steps=cfg.logging_steps, logging_first_step=True, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, eval_strategy="no", report_to=list(cfg.report_to) or "none",
        disable_tqdm=True, beta=cfg.beta, max_length=None, remove_unused_columns=False, use_cpu=not how.cuda,
        optim=how.optimizer, gradient_checkpointing=how.checkpointing)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(IM_END)
    collator = PairCollator(pad)
    (run_dir / METRICS_FILE).write_text("", encoding="utf-8")
    trainer = _pair_trainer()(model=policy, ref_model=None, args=args,
                              train_dataset=Dataset.from_list([_row(r) for r in rows]), processing_class=tokenizer,
                              data_collator=collator)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(metrics.TrainLog(run_dir / METRICS_FILE, collator, args.world_size,  # type: ignore[arg-type]
                                          cfg.gradient_accumulation))
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def _row(rendered: preferences.Rendered) -> dict[str, list[int]]:
    return {"prompt_ids": rendered.prompt_ids, "chosen_ids": rendered.chosen_ids, "rejected_ids": rendered.rejected_ids}


def _pair_trainer() -> type:
    """DPOTrainer on rows doppel has already rendered and tokenized (prompt_ids, chosen_ids, rejected_ids): its
    `_prepare_dataset` would tokenize text through the chat template, which is not how doppel renders a turn."""
    from trl import DPOTrainer

    class PairTrainer(DPOTrainer):

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset

    return PairTrainer


@dataclass
class PairCollator:
    """TRL's preference collator, recording each batch's (tokens, completion tokens) for the tokens/s figures as
    packing.Collator does."""

    pad_id: int
    batches: list[tuple[int, int]] = field(default_factory=list, init=False)
    counting: bool = field(default=True, init=False)

    def consumed(self, batches: int) -> tuple[int, int]:
        done = self.batches[:batches]
        return sum(t for t, _ in done), sum(t for _, t in done)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        batch = DataCollatorForPreference(pad_token_id=self.pad_id, pad_to_multiple_of=8)(examples)
        if self.counting:
            self.batches.append((int(batch["attention_mask"].sum()), int(batch["completion_mask"].sum())))
        return batch


def stack(first: dict[str, Any], first_config: dict[str, Any], second: dict[str, Any], second_r: int,
          second_alpha: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One LoRA adapter equal to two applied together: A = [A1; A2], B = [B1·s1, B2·s2] with s = alpha / r, at
    rank r1 + r2 and scale 1. The first adapter's other tensors (trained embeddings and head) stay as they are."""
    import torch

    if first_config.get("use_rslora") or first_config.get("use_dora") or first_config.get("rank_pattern") \
            or first_config.get("alpha_pattern"):
        raise TrainError("the --from run's adapter uses rsLoRA, DoRA or per-module ranks, which cannot be stacked")
    s1, s2 = first_config["lora_alpha"] / first_config["r"], second_alpha / second_r
    lora = {k for k in second if ".lora_A." in k or ".lora_B." in k}
    if lora != {k for k in first if ".lora_A." in k or ".lora_B." in k}:
        raise TrainError("the preference adapter does not cover the same layers as the --from run's")
    out = {}
    for key, tensor in first.items():
        if ".lora_A." in key:
            out[key] = torch.cat([tensor, second[key].to(tensor.dtype)], dim=0).contiguous()
        elif ".lora_B." in key:
            out[key] = torch.cat([tensor * s1, second[key].to(tensor.dtype) * s2], dim=1).contiguous()
        else:
            out[key] = tensor
    rank = first_config["r"] + second_r
    return out, {**first_config, "r": rank, "lora_alpha": rank}


def _save(trainer: Any, tokenizer: Any, source: Run, run: Run, info: RunInfo) -> None:
    """The stacked adapter and the tokenizer into the run dir; run.json, written last, marks the run finished."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from doppel.models import move_into

    if not trainer.is_world_process_zero():
        return
    policy = trainer.accelerator.unwrap_model(trainer.model)
    trained = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(policy).items()}
    lora = policy.peft_config["default"]
    first_config = json.loads((source.path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    tensors, stacked = stack(load_file(str(source.path / ADAPTER)), first_config, trained, lora.r, lora.lora_alpha)
    staging = run.path / ".final"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(tensors, str(staging / ADAPTER), metadata={"format": "pt"})
    (staging / ADAPTER_CONFIG).write_text(json.dumps(stacked, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(str(staging))
    move_into(staging, run.path)
    run.write_info(info)
