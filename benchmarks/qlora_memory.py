"""What QLoRA keeps in memory with and without peft's fp32 cast (prepare_model_for_kbit_training).

    python benchmarks/qlora_memory.py [LAYERS] [TOKENS]

Builds Mistral-7B's shape with LAYERS decoder layers (default 2) and random weights, loads it in 4-bit NF4
(bitsandbytes, bf16 compute, as `doppel train --mode qlora`), adds LoRA r=16 on all linear layers with gradient
checkpointing, and runs the decoder forward on TOKENS tokens (default 2048) in two ways: as doppel prepares it now
and after peft's prepare_model_for_kbit_training. Prints the bytes of the weights that are not 4-bit and the bytes
that autograd keeps from the forward for the backward (each storage once); two layer counts give the cost of
one more layer. Runs on CPU (a minute per layer pair at 2048 tokens); the tensors are the same on a GPU.
"""

import sys
import tempfile

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from doppel.models import RANDOM_SHAPES

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
shape = {**RANDOM_SHAPES["mistral-7b"], "num_hidden_layers": layers, "vocab_size": 49152}
folder = tempfile.mkdtemp()
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape), dtype=torch.bfloat16).save_pretrained(folder)
quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
ids = torch.randint(0, 49152, (1, tokens))
for way in ("doppel (no cast)", "peft prepare_model_for_kbit_training"):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quantized)
    if way.startswith("peft"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if type(p).__name__ != "Params4bit")
    kept: dict[int, int] = {}  # storage → bytes

    def pack(t: torch.Tensor, kept: dict[int, int] = kept) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.base_model.model.model(input_ids=ids).last_hidden_state
    hidden.float().sum().backward()
    total = sum(kept.values())
    print(f"{way}: weights outside 4-bit {weights / 2**20:,.0f} MiB, kept for backward {total / 2**20:,.1f} MiB "
          f"({total / tokens / 1024:.1f} KiB per token), residual stream {hidden.dtype}", flush=True)
