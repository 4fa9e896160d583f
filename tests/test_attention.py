"""doppel's varlen attention: each packed session attends to itself alone, with the block mask's results."""

import json

import pytest
import torch

from doppel.config import TrainConfig
from doppel.dataset import Dataset
from doppel.models import load_model
from doppel.run import Run
from doppel.training import packing
from doppel.training.attention import VARLEN, register, session_starts
from doppel.training.plan import attention_kernel
from doppel.training.train import train

FAST = dict(max_length=256, batch_size=2, logging_steps=1, save_steps=1000)


@pytest.fixture(scope="module")
def samples(sample_data, smollm2_tokenizer):
    return packing.tokenized(Dataset.open(sample_data), "train", smollm2_tokenizer, 256).select(range(12))


@pytest.fixture(scope="module")
def models(tiny):
    """The tiny GQA model (4 query heads, 2 key/value heads) with each kernel."""
    register()  # doppel's varlen, as training registers it
    return {kernel: load_model(str(tiny), attention=kernel) for kernel in ("sdpa", VARLEN)}


def test_session_starts_come_from_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])
    assert session_starts(positions).tolist() == [0, 3, 5, 9, 10]
    assert session_starts(torch.arange(6)[None]).tolist() == [0, 6]
    # a row that starts mid-count (a session split at a turn keeps counting) is still one session
    assert session_starts(torch.tensor([[4, 5, 6, 0, 1]])).tolist() == [0, 3, 5]


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return loss.item(), grads


def test_varlen_gives_the_block_mask_loss_and_gradients(samples, models, smollm2_tokenizer):
    packed = list(packing.rows(samples, 256, packing=True))
    pad = smollm2_tokenizer.pad_token_id
    joined = packing.Collator(pad, flatten=True)(packed)
    rows = packing.Collator(pad)(packed)
    assert joined["input_ids"].shape[0] == 1 and rows["input_ids"].shape[0] == 5
    reference_loss, reference_grads = loss_and_grads(models["sdpa"], rows)
    for batch in (joined, rows):  # one row, or five rows laid end to end
        loss, grads = loss_and_grads(models[VARLEN], batch)
        assert loss == pytest.approx(reference_loss, abs=1e-5)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # the control: without restarting positions the row is one session, and sessions see each other
    running = {**joined, "position_ids": torch.arange(joined["input_ids"].shape[1])[None]}
    with torch.no_grad():
        leaky = models[VARLEN](**running, use_cache=False).loss.item()
    assert abs(leaky - reference_loss) > 1e-4


def test_generation_with_padding_and_cache_falls_back_to_sdpa(models, smollm2_tokenizer):
    """A trained model can be loaded with varlen: generation (left padding, a growing cache) takes SDPA's path."""
    smollm2_tokenizer.padding_side = "left"
    prompts = smollm2_tokenizer(["hello there, how are you", "hi"], return_tensors="pt", padding=True)
    assert not bool(prompts["attention_mask"].all())
    out = {kernel: model.generate(**prompts, max_new_tokens=12, do_sample=False,
                                  pad_token_id=smollm2_tokenizer.pad_token_id)
           for kernel, model in models.items()}
    assert out[VARLEN].shape == (2, prompts["input_ids"].shape[1] + 12)
    assert out[VARLEN].tolist() == out["sdpa"].tolist()


@pytest.mark.parametrize("packed", [True, False])
def test_training_with_varlen_matches_sdpa_and_is_the_cpu_default(tiny, sample_data, tmp_path, packed):
    """With packing, and without (then varlen's joined row packs the micro-batch's sessions by itself)."""
    assert attention_kernel(TrainConfig(), cuda=False) == VARLEN
    assert attention_kernel(TrainConfig(), cuda=True) in ("sdpa", "flash_attention_2")
    runs = {}
    for kernel in ("sdpa", "auto"):
        # no LoRA dropout: its masks are drawn for the batch's shape, and varlen's batch is one row; fp32: the
        # kernels are compared to 1e-5, closer than bf16's rounding
        cfg = TrainConfig(model=str(tiny), mode="lora", max_steps=3, learning_rate=1e-2, seed=5, attention=kernel,
                          lora_dropout=0.0, packing=packed, precision="fp32", **FAST)
        info = train(sample_data, tmp_path / kernel, cfg)
        runs[info.attention] = [(r["step"], r["loss"]) for r in
                                   map(json.loads, (tmp_path / kernel / "metrics.jsonl").read_text().splitlines())
                                   if "loss" in r]
    assert list(runs) == ["sdpa", VARLEN]
    assert [step for step, _ in runs[VARLEN]] == [1, 2, 3]
    assert [loss for _, loss in runs[VARLEN]] == pytest.approx([loss for _, loss in runs["sdpa"]], abs=1e-5)
    # the kernel is not saved with the model: chat loads the run with SDPA, which generation needs
    model, _ = Run(tmp_path / "auto").load()
    info = Run(tmp_path / "auto").info
    assert info.attention == VARLEN and model.config._attn_implementation == "sdpa"
