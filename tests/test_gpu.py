"""The CUDA-only kernels give the losses of the plain path. Skipped without a GPU; `benchmarks/gpu.sh tests`
runs them on one."""

import pytest
import torch

from doppel.config import TrainConfig
from doppel.dataset import Dataset
from doppel.models import load_model
from doppel.run import Run
from doppel.training import packing
from doppel.training.attention import VARLEN, _torch_varlen
from doppel.training.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def test_varlen_flash_kernel_gives_the_block_mask_loss_and_gradients(sample_data, tiny, smollm2_tokenizer):
    """PyTorch's own varlen flash kernel (no flash-attn package) on packed sessions, against SDPA's block mask."""
    assert _torch_varlen() is not None
    samples = packing.tokenized(Dataset.open(sample_data), "train", smollm2_tokenizer, 256).select(range(12))
    packed = list(packing.rows(samples, 256, packing=True))
    pad = smollm2_tokenizer.pad_token_id
    batches = {"sdpa": packing.Collator(pad)(packed), VARLEN: packing.Collator(pad, flatten=True)(packed)}
    results = {}
    for kernel, batch in batches.items():
        model = load_model(str(tiny), dtype=torch.bfloat16, attention=kernel).cuda()
        loss = model(**{k: v.cuda() for k, v in batch.items()}, use_cache=False).loss
        loss.backward()
        results[kernel] = (loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.float())
    assert results[VARLEN][0] == pytest.approx(results["sdpa"][0], abs=1e-2)
    torch.testing.assert_close(results[VARLEN][1], results["sdpa"][1], atol=1e-2, rtol=5e-2)


def test_liger_kernels_train_with_the_plain_losses(sample_data, tiny, tmp_path):
    """Liger's RMSNorm, SwiGLU and RoPE kernels and the fused LM-head loss: the same training curve in fp32."""
    curves = {}
    for liger in (False, True):
        cfg = TrainConfig(model=str(tiny), mode="lora", max_steps=4, learning_rate=1e-2, seed=5, liger=liger,
                          precision="fp32", lora_dropout=0.0, max_length=256, batch_size=2, logging_steps=1,
                          save_steps=1000)
        train(sample_data, tmp_path / str(liger), cfg, save=False)
        curves[liger] = [row["loss"] for row in Run(tmp_path / str(liger)).metrics()
                         if "loss" in row]
    assert len(curves[True]) == 4
    assert curves[True] == pytest.approx(curves[False], abs=1e-3)
    assert curves[True][0] != curves[True][-1]


def test_a_real_out_of_memory_names_the_options_that_need_less(sample_data, tiny, tmp_path):
    """The allocator capped at 16 MB: the tiny model loads, its first step of 8 rows does not fit."""
    from doppel.training.train import TrainError

    torch.cuda.set_per_process_memory_fraction(16 * 2**20 / torch.cuda.get_device_properties(0).total_memory)
    try:
        with pytest.raises(TrainError) as failed:
            train(sample_data, tmp_path / "run", TrainConfig(model=str(tiny), max_steps=2, save_steps=1000))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert str(failed.value) == "out of GPU memory with 8 × 1024-token rows per micro-batch; try batch_size 4 with " \
        "gradient_accumulation 2 (the same steps), gradient_checkpointing on, mode qlora"
    assert not (tmp_path / "run").exists()
