"""`doppel train` and `doppel merge` on tiny random models with real tokenizers (and the embedded one)."""

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import dialogue, full_export, personal, sentencepiece_tokenizer, tiny_model
from transformers import AutoModelForCausalLM, TrainerCallback

from doppel.cli import main
from doppel.config import TrainConfig
from doppel.dataset import Dataset, DatasetStats
from doppel.errors import DatasetError, RunError, TrainError
from doppel.render import IGNORE
from doppel.run import Run
from doppel.training import packing
from doppel.training.plan import cpu_has_bf16, uses_bf16
from doppel.training.train import train

FAST = dict(max_length=256, batch_size=2, logging_steps=1, save_steps=1000)


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in Run(run).metrics() if "loss" in row]


@pytest.fixture(scope="module")
def samples(sample_data, smollm2_tokenizer):
    return packing.tokenized(Dataset.open(sample_data), "train", smollm2_tokenizer, 256).select(range(12))


@pytest.fixture(scope="module")
def tiny_lm(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny)


def test_packed_batch_has_the_loss_of_the_same_sessions_unpacked(samples, tiny_lm, smollm2_tokenizer):
    packed = packing.rows(samples, 256, packing=True)
    assert len(packed) == 5 and sorted(n for row in packed["seq_lengths"] for n in row) == \
        sorted(len(ids) for ids in samples["input_ids"])
    pad = smollm2_tokenizer.pad_token_id
    packed_batch = packing.Collator(pad)(list(packed))
    plain_collator = packing.Collator(pad)
    plain_batch = plain_collator(list(samples))
    assert packed_batch["input_ids"].shape == (5, 256) and plain_batch["input_ids"].shape[0] == 12
    assert int((packed_batch["labels"] != IGNORE).sum()) == plain_collator.consumed(1)[1] == \
        packing.count_targets(samples)
    with torch.no_grad():
        packed_loss = tiny_lm(**packed_batch, use_cache=False).loss
        plain_loss = tiny_lm(**plain_batch, use_cache=False).loss
        # the control: the same packed rows with running positions let sessions see each other
        running = torch.arange(256).expand(5, 256)
        leaky_loss = tiny_lm(**{**packed_batch, "position_ids": running}, use_cache=False).loss
    assert packed_loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)
    assert abs(leaky_loss.item() - plain_loss.item()) > 1e-4


def test_flash_attention_gets_the_batch_as_one_row_of_packed_sessions(samples, tiny_lm, smollm2_tokenizer):
    """transformers runs flash attention's varlen kernel (one causal span per session, from restarting
    positions) only for a batch of one row; several rows with restarting positions would go to the plain
    causal kernel and let a row's sessions see each other. So for flash attention the collator joins the
    rows: the same loss as the rows (checked with sdpa here, which honours both layouts), and the layout
    flash attention takes for packed sessions."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    packed = list(packing.rows(samples, 256, packing=True))
    rows = packing.Collator(smollm2_tokenizer.pad_token_id)(packed)
    joined_collator = packing.Collator(smollm2_tokenizer.pad_token_id, flatten=True)
    joined = joined_collator(packed)
    total = sum(len(row["input_ids"]) for row in packed)
    assert joined["input_ids"].shape == (1, -(-total // 8) * 8)
    assert joined_collator.consumed(1) == (total, packing.count_targets(samples))
    starts = (joined["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(samples) + (total % 8 != 0)  # every session, and the padding tail
    assert _is_packed_sequence(joined["position_ids"], 1)
    assert not _is_packed_sequence(rows["position_ids"], rows["input_ids"].shape[0])
    with torch.no_grad():
        assert tiny_lm(**joined, use_cache=False).loss.item() == pytest.approx(
            tiny_lm(**rows, use_cache=False).loss.item(), abs=1e-5)


def test_masked_positions_get_no_gradient(samples, tiny_lm, smollm2_tokenizer):
    batch = packing.Collator(smollm2_tokenizer.pad_token_id)(list(samples.select(range(2))))
    out = tiny_lm(**batch, use_cache=False)
    out.logits.retain_grad()
    out.loss.backward()
    grad = out.logits.grad.abs().sum(-1)
    predicts_target = batch["labels"][:, 1:] != IGNORE
    assert predicts_target.sum() > 20
    assert (grad[:, :-1][predicts_target] > 0).all()
    assert (grad[:, :-1][~predicts_target] == 0).all() and (grad[:, -1] == 0).all()
    tiny_lm.zero_grad()


def small_dataset(tmp_path: Path, write) -> Path:
    from doppel.config import PrepareConfig
    from doppel.preparing import pipeline

    export = write(full_export([personal(201, dialogue(start=0) + dialogue(start=7200, first_id=10))]))
    pipeline.prepare(export, tmp_path / "data", PrepareConfig(eval_fraction=0))
    return tmp_path / "data"


def test_tiny_model_overfits_one_batch(tiny, tmp_path, write):
    data = small_dataset(tmp_path, write)
    cfg = TrainConfig(model=str(tiny), mode="full", max_steps=60, learning_rate=1e-2, warmup=0,
                      lr_scheduler="constant_with_warmup", **{**FAST, "logging_steps": 20})
    info = train(data, tmp_path / "run", cfg)
    curve = losses(tmp_path / "run")
    assert [step for step, _ in curve] == [1, 20, 40, 60]
    assert curve[0][1] > 10 and curve[-1][1] < 0.1
    assert info.steps == 60 and info.mode == "full" and info.eval_loss is None
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_checkpointing_saves_memory_not_the_result(tiny, sample_data, tmp_path, mode):
    """Recomputing activations (on by default for big models on a GPU) trains exactly as keeping them."""
    runs = {}
    for checkpointing in ("off", "on"):
        cfg = TrainConfig(model=str(tiny), mode=mode, max_steps=3, learning_rate=1e-2, seed=5,
                          gradient_checkpointing=checkpointing, **FAST)
        train(sample_data, tmp_path / checkpointing, cfg, save=False)
        runs[checkpointing] = losses(tmp_path / checkpointing)
    assert [step for step, _ in runs["on"]] == [1, 2, 3]
    assert [loss for _, loss in runs["on"]] == pytest.approx([loss for _, loss in runs["off"]], abs=1e-5)
    assert runs["on"][0][1] != runs["on"][2][1]  # it trained


def test_precision_auto_is_bf16_where_the_cpu_multiplies_it_in_hardware():
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    native = "avx512_bf16" in flags or "amx_tile" in flags
    assert cpu_has_bf16() is native
    assert uses_bf16(TrainConfig(), cuda=False) is native
    assert uses_bf16(TrainConfig(precision="bf16"), cuda=False) is True
    assert uses_bf16(TrainConfig(precision="fp32"), cuda=False) is False
    assert uses_bf16(TrainConfig(precision="fp32"), cuda=True) is False


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_bf16_on_cpu_computes_in_bf16_and_trains_fp32_weights(tiny, sample_data, tmp_path, mode):
    """bf16 on CPU: the matmuls run in bf16 under autocast, LoRA's frozen base is stored in bf16, and the weights
    being trained (the adapters; every weight of a full fine-tune) stay fp32, so AdamW's small updates are not
    rounded away. The losses stay within bf16's rounding of the fp32 run's."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    seen: dict[str, Any] = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["trained"] = {p.dtype for p in model.parameters() if p.requires_grad}
            seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
            # peft's cast of each adapter's input to fp32, which autocast undoes at once, is off in a bf16 run
            seen["input casts"] = {m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer)}
            layer = next(m for name, m in model.named_modules() if name.endswith("layers.0.mlp.down_proj"))
            layer.register_forward_hook(lambda module, inputs, output: seen.update(output=output.dtype))

    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(model=str(tiny), mode=mode, max_steps=3, learning_rate=1e-3, seed=5, lora_dropout=0.0,
                          precision=precision, **FAST)  # type: ignore[arg-type]
        info = train(sample_data, tmp_path / precision, cfg, save=False,
                     callbacks=[Probe()] if precision == "bf16" else [])
        assert info.precision == precision
        runs[precision] = [loss for _, loss in losses(tmp_path / precision)]
    assert seen["trained"] == {torch.float32}
    assert seen["frozen"] == ({torch.bfloat16} if mode == "lora" else set())
    assert seen["output"] == torch.bfloat16
    assert seen["input casts"] == ({False} if mode == "lora" else set())
    assert len(runs["bf16"]) == 3 and runs["bf16"] == pytest.approx(runs["fp32"], rel=1e-2)
    assert runs["bf16"] != runs["fp32"]  # computed in bf16, not fp32


def test_qlora_keeps_embeddings_norms_and_head_in_bf16_over_a_4bit_base(smollm2_tokenizer, sample_data, tmp_path):
    """QLoRA (bitsandbytes' NF4 runs on CPU too): the decoder's linear layers are 4-bit; the embeddings, norms and
    LM head stay bf16 as loaded, so the residual stream is bf16. peft's prepare_model_for_kbit_training would make
    them fp32, and with them every hidden state that checkpointing keeps. The adapters train in bf16 (TRL's rule for
    QLoRA). It trains like LoRA on the same base, and the run loads for chat. (64 wide: bitsandbytes' CPU
    kernel for evaluation packs the weights in blocks of 64.)"""
    import bitsandbytes as bnb

    tiny = tiny_model(tmp_path / "tiny64", smollm2_tokenizer, hidden=64)

    seen: dict[str, Any] = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["4-bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
            seen["trained"] = {p.dtype for p in model.parameters() if p.requires_grad}
            seen["rest"] = {p.dtype for p in model.parameters() if not p.requires_grad
                            and type(p).__name__ != "Params4bit"}
            layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
            layer.register_forward_hook(lambda module, inputs, output: seen.update(hidden=output[0].dtype))

    runs = {}
    for mode in ("lora", "qlora"):
        # QLoRA with checkpointing, as for a 7B (on by default over 1B parameters on a GPU)
        cfg = TrainConfig(model=str(tiny), mode=mode, max_steps=4, learning_rate=1e-2, seed=5, precision="bf16",
                          gradient_checkpointing="on" if mode == "qlora" else "off", **FAST)  # type: ignore[arg-type]
        train(sample_data, tmp_path / mode, cfg, callbacks=[Probe()] if mode == "qlora" else [])
        runs[mode] = [loss for _, loss in losses(tmp_path / mode)]
    assert seen == {"4-bit": 14, "trained": {torch.bfloat16}, "rest": {torch.bfloat16}, "hidden": torch.bfloat16}
    assert len(runs["qlora"]) == 4 and runs["qlora"][-1] < runs["qlora"][0] - 0.05
    assert runs["qlora"] == pytest.approx(runs["lora"], abs=0.05) and runs["qlora"] != runs["lora"]
    model, _ = Run(tmp_path / "qlora").load()
    info = Run(tmp_path / "qlora").info
    assert info.mode == "qlora"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 9224, 198, 2]])).logits).all()


def test_micro_batch_defaults_to_one_row_on_cpu(tiny, sample_data, tmp_path):
    """No --batch-size: one row per micro-batch on CPU (the fastest there, docs/benchmarks.md), recorded as such."""
    import yaml

    cfg = TrainConfig(model=str(tiny), max_steps=2, max_length=256, logging_steps=1, save_steps=1000)
    assert cfg.batch_size is None
    train(sample_data, tmp_path / "run", cfg)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["batch_size"] is None  # as given
    assert Run(tmp_path / "run").info.plan["rows"] == 1  # as resolved here
    rows = [r for r in Run(tmp_path / "run").metrics() if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["tokens"] - before <= 256 for r, before in zip(
        rows, [0, rows[0]["tokens"]], strict=True))


class Interrupt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_where_it_stopped(tiny, sample_data, tmp_path):
    cfg = TrainConfig(model=str(tiny), max_steps=6, learning_rate=1e-2, seed=3, **{**FAST, "save_steps": 2})
    train(sample_data, tmp_path / "whole", cfg)
    with pytest.raises(KeyboardInterrupt):
        train(sample_data, tmp_path / "cut", cfg, callbacks=[Interrupt(3)])
    cut = tmp_path / "cut"
    assert not (cut / "run.json").exists() and not (cut / "adapter_model.safetensors").exists()
    with pytest.raises(RunError, match="is an unfinished run; finish it with doppel train"):
        Run(cut).load()
    result = run_cli("train", sample_data, "-o", cut)
    assert result.exit_code == 2 and "is not empty; resume to continue the run there" in result.output

    result = run_cli("train", sample_data, "-o", cut, "--resume")  # the saved config.yaml is reused
    assert result.exit_code == 0, result.output
    assert json.loads((cut / "run.json").read_text())["steps"] == 6
    whole, resumed = losses(tmp_path / "whole"), losses(cut)
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    # same steps, same batches in the same order, same optimizer state: the same losses
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in whole], abs=1e-5)
    # the running token counts go on from the checkpoint
    counts = {run: [(r["tokens"], r["target_tokens"]) for r in Run(run).metrics() if "tokens" in r]
              for run in (tmp_path / "whole", cut)}
    assert counts[cut] == counts[tmp_path / "whole"]


class Seen(TrainerCallback):
    """The step a run (re)starts from, and the train_loss transformers reports for the steps it ran."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_loss" in logs:
            self.train_loss = logs["train_loss"]


# checkpoints at steps 2 and 4 fall between the log steps 1, 3 and 6
CUT_CFG = dict(max_steps=7, learning_rate=1e-2, seed=3, **{**FAST, "save_steps": 2, "logging_steps": 3})


@pytest.fixture(scope="module")
def cut_run(tiny, sample_data, tmp_path_factory):
    """A run of 7 steps, and the same run stopped at step 5 (checkpoints 2 and 4), with transformers' train_loss
    for the whole run."""
    folder = tmp_path_factory.mktemp("cut")
    cfg = TrainConfig(model=str(tiny), **CUT_CFG)
    seen = Seen()
    whole = train(sample_data, folder / "whole", cfg, callbacks=[seen])
    with pytest.raises(KeyboardInterrupt):
        train(sample_data, folder / "cut", cfg, callbacks=[Interrupt(5)])
    assert sorted(p.name for p in (folder / "cut" / "checkpoints").iterdir()) == ["README.md", "checkpoint-2",
                                                                                   "checkpoint-4"]
    return {"whole": folder / "whole", "cut": folder / "cut", "cfg": dataclasses.replace(cfg, resume=True),
            "whole_info": whole, "whole_hf_loss": seen.train_loss}


def windows(run: Path) -> list[tuple[int, int]]:
    return [(row["step"], row["loss_steps"]) for row in Run(run).metrics() if "loss" in row]


def test_train_loss_of_a_resumed_run_is_the_mean_over_all_its_steps(cut_run, sample_data, tmp_path):
    """transformers' train_loss counts only the steps of the process that ran them: after a resume, the steps since
    the checkpoint. doppel's is the mean over every step of the run: each metrics row says how many steps its loss
    averages, and every checkpoint and the last step end a window, so the rows left at a checkpoint tile its steps."""
    run = tmp_path / "run"
    shutil.copytree(cut_run["cut"], run)
    seen = Seen()
    info = train(sample_data, run, cut_run["cfg"], callbacks=[seen])
    whole = cut_run["whole_info"].train_loss
    assert seen.first_step == 4 and info.steps == 7
    assert whole == pytest.approx(cut_run["whole_hf_loss"], abs=1e-6)  # an uninterrupted run: transformers' figure
    assert info.train_loss == pytest.approx(whole, abs=1e-4)
    # transformers' figure for the resumed steps 5 to 7 alone, which run.json used to report
    rows = {step: loss for step, loss in losses(run)}
    assert seen.train_loss == pytest.approx((2 * rows[6] + rows[7]) / 3, abs=1e-6)
    assert abs(seen.train_loss - whole) > 0.01
    assert windows(run) == windows(cut_run["whole"]) == [(1, 1), (2, 1), (3, 1), (4, 1), (6, 2), (7, 1)]


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


def test_resume_skips_a_damaged_checkpoint_with_a_warning(cut_run, sample_data, tmp_path, caplog):
    """A checkpoint whose save was cut short (a full disk, a killed process) can hold a truncated file; resuming
    goes back to the newest complete checkpoint and says so, and runs the same steps from there."""
    run = tmp_path / "run"
    shutil.copytree(cut_run["cut"], run)
    optimizer = run / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    truncate(optimizer, optimizer.stat().st_size // 2)
    seen = Seen()
    info = train(sample_data, run, cut_run["cfg"], callbacks=[seen])
    assert [r.getMessage() for r in caplog.records if r.name == "doppel.run"] == [
        "checkpoint-4 is damaged (optimizer.pt is truncated); resuming from checkpoint-2"]
    assert seen.first_step == 2 and info.steps == 7
    resumed, whole = losses(run), losses(cut_run["whole"])
    assert [step for step, _ in resumed] == [step for step, _ in whole] == [1, 2, 3, 4, 6, 7]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in whole], abs=1e-5)
    assert info.train_loss == pytest.approx(cut_run["whole_info"].train_loss, abs=1e-4)


def test_the_cli_says_which_damaged_checkpoint_it_skipped_in_one_line(cut_run, sample_data, tmp_path):
    """The library's warning comes out as one line of its own on stderr, and the run goes on from checkpoint-2."""
    run = tmp_path / "run"
    shutil.copytree(cut_run["cut"], run)
    optimizer = run / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    truncate(optimizer, optimizer.stat().st_size // 2)
    result = run_cli("train", sample_data, "-o", run, "--resume")
    assert result.exit_code == 0
    # the rest of stderr is the progress bars of this test process (a doppel process has none: TQDM_DISABLE)
    assert result.stderr.splitlines()[0] == \
        "doppel: warning: checkpoint-4 is damaged (optimizer.pt is truncated); resuming from checkpoint-2"
    assert result.stderr.count("damaged") == 1
    assert result.stdout.startswith("step 3/7 ") and result.stdout.endswith(f"\nwrote {run}\n")


@pytest.mark.parametrize(("file", "size", "problem"), [
    ("optimizer.pt", 1000, "optimizer.pt is truncated"),
    ("adapter_model.safetensors", 100, "adapter_model.safetensors is truncated"),  # in the header
    ("adapter_model.safetensors", 60_000, "adapter_model.safetensors is truncated"),  # in the tensors
    ("trainer_state.json", 300, "trainer_state.json is not valid JSON"),
])
def test_resume_refuses_when_every_checkpoint_is_damaged(cut_run, sample_data, tmp_path, file, size, problem):
    run = tmp_path / "run"
    shutil.copytree(cut_run["cut"], run)
    for step in (2, 4):
        truncate(run / "checkpoints" / f"checkpoint-{step}" / file, size)
    with pytest.raises(TrainError) as refused:
        train(sample_data, run, cut_run["cfg"])
    assert str(refused.value) == f"cannot resume: checkpoint-4 is damaged ({problem}), checkpoint-2 is damaged " \
        f"({problem}); delete {run / 'checkpoints'} and run the same command to start over"
    result = run_cli("train", sample_data, "-o", run, "--resume")
    assert (result.exit_code, result.output) == (2, f"doppel: error: {refused.value}\n")


@pytest.mark.parametrize(("save_steps", "stop_at", "said"), [
    (1000, "step 2/", "interrupted before the first checkpoint; nothing was kept"),
    (1, "step 3/", "interrupted; continue with: doppel train {data} -o {run} --resume"),
])
def test_ctrl_c_says_whether_the_run_can_go_on(tiny, sample_data, tmp_path, save_steps, stop_at, said):
    """Ctrl-C (SIGINT) of the real command: a run with no checkpoint yet is removed, a run with one is kept."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "doppel", "train", str(sample_data), "-o", str(run), "--model",
                             str(tiny), "--max-steps", "1000", "--save-steps", str(save_steps), "--max-length", "256",
                             "--batch-size", "2", "--logging-steps", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(stop_at):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    # nothing else on stderr: no library's notices (bitsandbytes' on CPUs with AVX512-BF16), no traceback
    assert (proc.returncode, err) == (2, "doppel: error: " + said.format(data=sample_data, run=run) + "\n")
    assert run.exists() == (save_steps == 1)


def test_tokenizer_without_chatml_gets_trainable_chatml_embeddings(sample_data, tmp_path):
    from safetensors import safe_open

    tokenizer = sentencepiece_tokenizer()
    n = len(tokenizer)
    model_dir = tiny_model(tmp_path / "sp", tokenizer)
    train(sample_data, tmp_path / "run", TrainConfig(model=str(model_dir), max_steps=2, learning_rate=1e-2,
                                                     warmup=0, **FAST))
    model, loaded = Run(tmp_path / "run").load()
    assert loaded.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [n, n + 1]
    assert model.get_input_embeddings().weight.shape[0] == n + 2
    with safe_open(str(tmp_path / "run" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if "lora" not in k}  # noqa: SIM118
    assert shapes["base_model.model.model.embed_tokens.weight"] == (n + 2, 32)  # saved with the adapter
    base = AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight
    tuned = model.get_input_embeddings().weight
    assert not torch.allclose(tuned[:n], base, atol=1e-4)  # the embeddings trained
    # the new rows start at the mean embedding and two Adam steps of 1e-2 move them
    assert (tuned[n:] - tuned[:n].mean(0)).abs().max() > 5e-3


def test_merge_writes_a_standalone_model_with_the_same_outputs(tiny, sample_data, tmp_path):
    run = tmp_path / "run"
    train(sample_data, run, TrainConfig(model=str(tiny), max_steps=3, learning_rate=1e-2, **FAST))
    result = run_cli("merge", run, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    tuned, _ = Run(run).load()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny)
    ids = torch.tensor([[1, 9224, 198, 2]])
    with torch.no_grad():
        a, b, c = (m(ids).logits for m in (tuned, merged, base))
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)
    assert run_cli("merge", tmp_path / "merged", "-o", tmp_path / "again").output == \
        f"doppel: error: {tmp_path / 'merged'} is not a doppel run (no run.json, no config.yaml)\n"


@pytest.mark.parametrize(("args", "expected"), [
    (["--max-length", "8"], "max_length must be at least 32 tokens, got 8"),
    (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["--model", "/nonexistent/model"], "cannot load the config of /nonexistent/model offline"),
    (["--report-to", "mlflow"], "report_to: unknown 'mlflow'"),
])
def test_impossible_settings_give_one_line_and_exit_2(sample_data, tmp_path, args, expected):
    result = run_cli("train", sample_data, "-o", tmp_path / "run", *args)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("doppel: error: ") and expected in result.output
    assert not (tmp_path / "run" / "run.json").exists()


NOT_HERE = [(args, expected) for args, expected, missing in [
    (["--mode", "qlora"], "mode qlora needs a model in Hugging Face format: the embedded model is GGUF, which "
                          "transformers loads only dequantized; use mode lora for it", None),
    (["--mode", "qlora", "--model", "random:smollm2-135m"], "mode qlora needs the bitsandbytes package, which is "
                                                            "not installed: pip install bitsandbytes", "bitsandbytes"),
    (["--liger"], "liger needs an NVIDIA GPU", "cuda"),
    (["--attention", "flash_attention_2"], "attention flash_attention_2 needs an NVIDIA GPU", "cuda"),
    (["--optim", "adamw_8bit"], "optim adamw_8bit needs the bitsandbytes package, which is not installed: "
                                "pip install bitsandbytes", "bitsandbytes"),
    (["--report-to", "tensorboard"], "report_to tensorboard needs the tensorboard package, which is not "
                                     "installed: pip install tensorboard", "tensorboard"),
    (["--report-to", "wandb"], "report_to wandb needs the wandb package, which is not installed: "
                               "pip install wandb", "wandb"),
    (["--report-to", "trackio"], "report_to trackio needs the trackio package, which is not installed: "
                                 "pip install trackio", "trackio"),
] if missing is None or not (torch.cuda.is_available() if missing == "cuda" else importlib.util.find_spec(missing))]


@pytest.mark.parametrize(("args", "expected"), NOT_HERE)
def test_options_this_machine_cannot_run_are_refused_before_anything_is_written(sample_data, tmp_path, args,
                                                                                expected):
    result = run_cli("train", sample_data, "-o", tmp_path / "run", *args)
    assert (result.exit_code, result.output) == (2, f"doppel: error: {expected}\n")
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tiny, sample_data, tmp_path):
    """A model whose weights cannot be read fails after the sessions were tokenized into the run directory:
    the directory goes, so the same command can run again once the model is fixed."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    result = run_cli("train", sample_data, "-o", tmp_path / "run", "--model", broken, "--max-steps", "1")
    # (the test process imported `datasets` before the CLI could turn its progress bars off)
    assert result.exit_code == 2 and result.output.splitlines()[-1] == \
        f"doppel: error: cannot load {broken} offline: Error while deserializing header: header too large"
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # a directory that was there before is left as it was
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = run_cli("train", sample_data, "-o", tmp_path / "run", "--model", broken, "--resume")
    assert result.exit_code == 2 and [p.name for p in (tmp_path / "run").iterdir()] != ["notes.txt"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


class OutOfMemory(TrainerCallback):
    """What PyTorch raises when a CUDA allocation fails (a real one: tests/test_gpu.py)."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_says_which_options_need_less(tiny, sample_data, tmp_path):
    cfg = TrainConfig(model=str(tiny), max_steps=4, **FAST)
    with pytest.raises(TrainError) as fresh:
        train(sample_data, tmp_path / "fresh", cfg, callbacks=[OutOfMemory()])
    assert str(fresh.value) == "out of GPU memory with 2 × 256-token rows per micro-batch; try batch_size 1 with " \
        "gradient_accumulation 2 (the same steps), gradient_checkpointing on, mode qlora"
    assert not (tmp_path / "fresh").exists()
    cfg = dataclasses.replace(cfg, batch_size=1, save_steps=1, mode="full", gradient_checkpointing="on")
    with pytest.raises(TrainError) as saved:
        train(sample_data, tmp_path / "saved", cfg, callbacks=[OutOfMemory()])
    assert str(saved.value) == "out of GPU memory with 1 × 256-token rows per micro-batch; try max_length " \
        "128, mode lora or mode qlora, or more GPUs (configs/fsdp.yaml); the checkpoints so far are kept in " \
        f"{tmp_path / 'saved' / 'checkpoints'}, resume goes on from the last"
    assert sorted(p.name for p in (tmp_path / "saved" / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2"]


def test_missing_or_empty_dataset(tmp_path):
    result = run_cli("train", tmp_path / "nope", "-o", tmp_path / "run")
    assert result.output == f"doppel: error: {tmp_path / 'nope'}: no such dataset directory\n"
    (tmp_path / "nope").mkdir()
    result = run_cli("train", tmp_path / "nope", "-o", tmp_path / "run")
    assert result.output == f"doppel: error: {tmp_path / 'nope'} is not a doppel dataset (no stats.json); " \
                            "run doppel prepare\n"
    (tmp_path / "empty").mkdir()
    DatasetStats(None, None, 0, 0, 0, 0.0, 0.0, 0, ()).write(tmp_path / "empty")
    (tmp_path / "empty" / "sessions.train.jsonl").write_text("")
    result = run_cli("train", tmp_path / "empty", "-o", tmp_path / "run")
    assert result.exit_code == 2 and "has no training sessions" in result.output


SHIMS = Path(__file__).parent / "shims"
FSDP_ON_CPU = [SHIMS / "fsdp_on_cpu"]  # accelerate's CPU refusal lifted: torch's FSDP2 itself runs over gloo
# fp32: sharded and unsharded runs are compared to 1e-5, closer than bf16's rounding
TINY_RUN = ["--max-steps", "4", "--save-steps", "2", "--max-length", "256", "--batch-size", "2", "--logging-steps",
            "1", "--precision", "fp32"]


def launch(config: Path, data: Path, out: Path, shims: list[Path], *args: str) -> None:
    """`accelerate launch --config_file CONFIG -m doppel train DATA -o OUT ARGS` on two CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(map(str, shims))}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           "-m", "doppel", "train", str(data), "-o", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{out.name}: {proc.stderr[-3000:]}"
    assert proc.stdout.count("wrote ") == 1  # one process reports


def two_cpus(tmp_path: Path, **fsdp_config: Any) -> Path:
    """The shipped FSDP launcher config, for two CPU processes in fp32."""
    import yaml

    shipped = yaml.safe_load((Path(__file__).parent.parent / "configs" / "fsdp.yaml").read_text())
    shipped["fsdp_config"].update(fsdp_config)
    launcher = tmp_path / "two-cpus.yaml"
    launcher.write_text(yaml.safe_dump({**shipped, "use_cpu": True, "num_processes": 2, "mixed_precision": "no"}))
    return launcher


def steps(run: Path) -> list[tuple[Any, ...]]:
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("tokens"), r.get("learning_rate"))
            for r in Run(run).metrics()]


def test_fsdp_full_fine_tuning_on_two_cpu_processes_matches_ddp(tiny, sample_data, tmp_path):
    """The shipped launcher config three ways: as accelerate runs it on CPU (plain DDP over gloo), with FSDP2
    itself, and with FSDP2 under torch < 2.13's hooks for multi-module units (tests/shims/torch_before_2_13),
    where the step after an evaluation and a checkpoint used to fail ("mixed torch.Tensor and DTensor", seen on
    an H100 with torch 2.11). Each evaluates and saves at step 2 of 4; sharded or not, the losses and the saved
    weights agree. Then the sharded run, cut back to its step-2 checkpoint, resumes to the same steps 3 and 4."""
    launcher = two_cpus(tmp_path)
    ways = {"ddp": [], "fsdp": FSDP_ON_CPU, "fsdp-torch-2.12": [SHIMS / "torch_before_2_13", *FSDP_ON_CPU]}
    for way, shims in ways.items():
        launch(launcher, sample_data, tmp_path / way, shims, "--model", str(tiny), "--mode", "full", *TINY_RUN)
    infos = {way: json.loads((tmp_path / way / "run.json").read_text()) for way in ways}
    assert {way: (i["processes"], i["distributed"], i["steps"]) for way, i in infos.items()} == {
        "ddp": (2, "multi_cpu", 4), "fsdp": (2, "fsdp", 4), "fsdp-torch-2.12": (2, "fsdp", 4)}
    # two processes take twice the rows per step: an epoch is rows / (2 × 2) steps
    rows = len(packing.rows(packing.cached(tmp_path / "ddp" / "tokens" / "train", lambda: None), 256, True))
    assert infos["fsdp"]["epochs"] == pytest.approx(4 / -(-rows // 4), abs=1e-4)
    ddp = steps(tmp_path / "ddp")
    assert [(step, loss is None) for step, loss, *_ in ddp] == [
        (1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]
    ddp_weights = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").state_dict()
    for way in ("fsdp", "fsdp-torch-2.12"):
        sharded = steps(tmp_path / way)
        assert [row[0] for row in sharded] == [row[0] for row in ddp]
        assert [loss or eval_loss for _, loss, eval_loss, *_ in sharded] == pytest.approx(
            [loss or eval_loss for _, loss, eval_loss, *_ in ddp], abs=1e-4)
        weights = AutoModelForCausalLM.from_pretrained(tmp_path / way).state_dict()
        assert weights.keys() == ddp_weights.keys()
        assert all(torch.allclose(weights[k], ddp_weights[k], atol=1e-5) for k in weights)

    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "checkpoint-4")
    (tmp_path / "resumed" / "run.json").unlink()
    launch(launcher, sample_data, tmp_path / "resumed", FSDP_ON_CPU, "--resume")
    assert steps(tmp_path / "resumed") == steps(tmp_path / "fsdp")


def test_fsdp_lora_on_two_cpu_processes_saves_the_whole_adapter(tiny, sample_data, tmp_path):
    """LoRA sharded with FSDP2 saves the same adapter as under DDP, also from a launcher config that turns on
    accelerate's activation checkpointing (its wrapper used to hide every LoRA weight from the save: an empty
    adapter; doppel checkpoints with transformers instead)."""
    from safetensors.torch import load_file

    args = ["--model", str(tiny), "--mode", "lora", *TINY_RUN]
    launch(two_cpus(tmp_path), sample_data, tmp_path / "ddp", [], *args)
    launch(two_cpus(tmp_path, fsdp_activation_checkpointing=True), sample_data, tmp_path / "fsdp", FSDP_ON_CPU,
           *args)
    assert json.loads((tmp_path / "fsdp" / "run.json").read_text())["distributed"] == "fsdp"
    sharded, ddp = (load_file(tmp_path / way / "adapter_model.safetensors") for way in ("fsdp", "ddp"))
    assert len(ddp) == 2 * 7 * 2  # A and B for 7 linear layers in each of 2 decoder layers
    assert sharded.keys() == ddp.keys()
    assert all(torch.allclose(sharded[k], ddp[k], atol=1e-5) for k in ddp)
    assert any(ddp[k].abs().sum() > 0 for k in ddp if "lora_B" in k)  # trained (B starts at zero)
    sharded_log, ddp_log = steps(tmp_path / "fsdp"), steps(tmp_path / "ddp")
    assert [row[0] for row in sharded_log] == [row[0] for row in ddp_log] == [1, 2, 2, 3, 4, 4]
    assert [loss or eval_loss for _, loss, eval_loss, *_ in sharded_log] == pytest.approx(
        [loss or eval_loss for _, loss, eval_loss, *_ in ddp_log], abs=1e-4)


@pytest.mark.slow
def test_embedded_model_trains_end_to_end(sample_data, tmp_path):
    result = run_cli("train", sample_data, "-o", tmp_path / "run", "--max-steps", "3", "--batch-size", "2",
                     "--max-length", "256", "--logging-steps", "1")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'run'}" in result.output.splitlines()
    info = Run(tmp_path / "run").info
    assert (info.base, info.mode, info.steps) == (None, "lora", 3)
    rows = Run(tmp_path / "run").metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 3] and rows[-1]["eval_loss"] > 0
    assert all(set(r) == {"step", "epoch", "loss", "loss_steps", "learning_rate", "tokens_per_s",
                          "target_tokens_per_s", "tokens", "target_tokens", "train_seconds"}
               for r in rows[:3])
    model, tokenizer = Run(tmp_path / "run").load()
    assert type(model).__name__ == "PeftModelForCausalLM" and len(tokenizer) == 49152


def test_shipped_presets_are_valid_configs():
    from doppel import config

    folder = Path(__file__).parent.parent / "configs"
    presets = {p.stem: config.load(TrainConfig, p, {}) for p in folder.glob("*.yaml") if p.stem != "fsdp"}
    assert {name: (cfg.mode, cfg.gradient_checkpointing) for name, cfg in presets.items()} == {
        "demo": ("lora", "auto"), "lora-7b": ("lora", "auto"), "qlora-7b": ("qlora", "on"),
        "full-fsdp": ("full", "on")}
    assert presets["lora-7b"].model == "cognitivecomputations/dolphin-2.2.1-mistral-7b"


def test_cpu_loss_projects_only_targets_with_trls_loss_and_gradients(samples, tiny, smollm2_tokenizer):
    """doppel.loss.target_loss (the CPU training loss) against TRL's fused LM head and transformers' own loss,
    on packed rows and on one joined row: the same value and gradients; a batch without targets gives a zero
    that can still be backpropagated."""
    from trl.trainer.utils import add_fused_lm_head

    from doppel.training.loss import target_loss

    model = AutoModelForCausalLM.from_pretrained(tiny)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    packed = list(packing.rows(samples, 256, packing=True))
    pad = smollm2_tokenizer.pad_token_id

    def run(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}

    for batch in (packing.Collator(pad)(packed), packing.Collator(pad, flatten=True)(packed)):
        ours = run(lambda b=batch: target_loss(model, b))
        for reference in (run(lambda b=batch: model(**b, fused_lm_head=True).loss),
                          run(lambda b=batch: model(**b, use_cache=False).loss)):
            assert ours[0] == pytest.approx(reference[0], abs=1e-5)
            for name, grad in ours[1].items():
                torch.testing.assert_close(grad, reference[1][name], atol=1e-6, rtol=1e-4, msg=name)
        # normalised by the count given (gradient accumulation: the targets of all the step's micro-batches)
        targets = int((batch["labels"] != IGNORE).sum())
        assert target_loss(model, batch, torch.tensor(2 * targets)).item() == pytest.approx(ours[0] / 2, abs=1e-6)
    nothing = {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}
    empty = target_loss(model, nothing)
    empty.backward()
    assert empty.item() == 0.0


def test_a_finished_run_trains_on_to_a_larger_budget(tiny, sample_data, tmp_path):
    """Finish 4 steps, extend to 6: steps 1-4 of metrics.jsonl are the first run's, no step is logged twice, and
    the run is finished again at 6; a budget it has already reached is refused in one line."""
    cfg = TrainConfig(model=str(tiny), max_steps=4, learning_rate=1e-2, seed=3, **FAST)
    run = tmp_path / "run"
    first = train(sample_data, run, cfg)
    before = [row for row in Run(run).metrics() if "loss" in row]
    assert (first.steps, [row["step"] for row in before]) == (4, [1, 2, 3, 4])
    assert [p.name for p in Run(run).checkpoints] == ["checkpoint-4"]  # saved at the end, so it can train on
    with pytest.raises(TrainError) as err:
        train(sample_data, run, cfg)
    assert str(err.value) == f"{run} already holds a finished run; choose another out, or resume it with a larger " \
                             "max_steps or epochs to train it further"
    result = run_cli("train", sample_data, "-o", run, "--resume")  # the saved config: max_steps 4
    assert (result.exit_code, result.output) == (2, f"doppel: error: {run} has already trained 4 steps (0.058 "
                                                    "epochs): nothing more to do with max_steps 4; give a larger "
                                                    "max_steps or epochs\n")
    assert Run(run).finished
    with pytest.raises(TrainError, match="liger needs an NVIDIA GPU"):  # refused before the run is touched
        train(sample_data, run, dataclasses.replace(cfg, resume=True, max_steps=6, liger=True))
    assert Run(run).finished
    result = run_cli("train", sample_data, "-o", run, "--resume", "--max-steps", 6)
    assert result.exit_code == 0, result.output
    assert any(line.startswith("trained 6 steps") for line in result.output.splitlines()), result.output[-600:]
    rows = [row for row in Run(run).metrics() if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[:4] == before
    steps = [(row["step"], "loss" in row) for row in Run(run).metrics()]
    assert len(steps) == len(set(steps))  # no line twice
    assert Run(run).info.steps == 6 and Run(run).config.max_steps == 6
    assert Run(run).info.train_loss == pytest.approx(sum(row["loss"] for row in rows) / 6, abs=1e-6)


def test_a_session_time_past_what_a_date_holds_is_refused_at_once(sample_data, tiny, tmp_path):
    """A time past 2**63 (as a JSONL export with a wrong `time` can give) was an OverflowError after 22 s and 739 MB
    of tokenizing; the dataset's reading refuses it, before the model or the tokenizer are loaded."""
    import time

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    path = data / "sessions.train.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    session = json.loads(lines[2])
    lines[2] = json.dumps({**session, "start": 2**63 + 1, "end": 2**63 + 1}) + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    began = time.perf_counter()
    with pytest.raises(DatasetError) as refused:
        train(data, tmp_path / "run", TrainConfig(model=str(tiny), max_steps=1, **FAST))
    assert time.perf_counter() - began < 2 and not (tmp_path / "run").exists()
    assert str(refused.value) == (
        f"{path}, line 3: session {session['id']} starts at 9223372036854775809, not a time (unix seconds of the years "
        "1 to 9999); correct the export's times and run doppel prepare again")
    result = run_cli("train", data, "-o", tmp_path / "run", "--model", tiny)
    assert (result.exit_code, result.output) == (2, f"doppel: error: {refused.value}\n")
