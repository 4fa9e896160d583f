"""`doppel bench train`: the figures it derives, and a real run of both setups on a tiny model."""

import json

import pytest
from click.testing import CliRunner

from doppel import bench
from doppel.cli import main


def test_steady_state_figures_leave_out_the_first_tenth():
    rows = [{"step": s, "tokens": 1000 * s, "target_tokens": 600 * s, "train_seconds": 0.5 + 2.0 * s}
            for s in range(1, 21)]
    rows[0]["train_seconds"] = 9.0  # a slow first step (compilation, allocation) is not measured
    assert bench._measure(rows) == {"tokens_per_s": 300.0, "all_tokens_per_s": 500.0, "step_time_s": 2.0,
                                    "steps": 20, "measured_steps": 18}


def test_both_setups_train_on_the_same_target_tokens(tiny, sample_data, tmp_path):
    out = tmp_path / "bench.json"
    run = CliRunner().invoke(main, ["bench", "train", "--dataset", str(sample_data), "--model", str(tiny), "--tokens",
                                    "3000", "--batch-size", "2", "--max-length", "256", "--precision", "fp32",
                                    "--json", str(out)])
    assert run.exit_code == 0, run.output
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["mode"] == "lora" and 3000 <= result["target_tokens"] < 3400
    assert result["reference"]["batch"] == "8 rows, padded, up to 256 tokens"
    assert result["doppel"]["batch"] == "2 rows, packed to 256 tokens"
    assert (result["reference"]["attention"], result["doppel"]["attention"]) == ("sdpa", "varlen")
    assert result["reference"]["precision"] == result["doppel"]["precision"] == "fp32"
    for name in ("reference", "doppel"):
        figures = result[name]
        assert figures["tokens_per_s"] > 0 and figures["all_tokens_per_s"] > figures["tokens_per_s"]
        assert "mfu" not in figures  # no GPU, no peak FLOP/s to compare with
    assert result["speedup"] == pytest.approx(result["doppel"]["tokens_per_s"] / result["reference"]["tokens_per_s"],
                                              abs=0.01)


def test_generation_speed_of_a_reply(tiny):
    from doppel.engines import llama_cpp_installed

    result = bench.bench_chat(tiny, tokens=8, repeats=2)
    assert (result["prompt_tokens"], result["new_tokens"], result["repeats"]) == (17, 8, 2)
    [row] = result["engines"]  # a model directory has no GGUF export: transformers alone, and why
    assert (row["engine"], row["file"], row["speedup"]) == ("transformers", None, 1.0)
    assert 0 < row["time_to_first_token_s"] < 5 and row["tokens_per_s"] > 0
    assert result["skipped"] == (f"llama.cpp: {tiny} has no GGUF export (doppel export)"
                                 if llama_cpp_installed() else
                                 "llama.cpp: llama-cpp-python is not installed")


def test_peak_memory_is_each_recipes_own():
    """The CPU peak is reset before each recipe, so doppel's figure is not the reference's high-water mark."""
    block = bytearray(300 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    with_block = bench._peak_rss()
    del block
    bench._reset_peak_rss()
    assert bench._peak_rss() < with_block - 250 * 2**20
