"""`train`: fine-tuning on a dataset (LoRA, QLoRA, full; CPU, a GPU, FSDP) and what it logs."""
