"""Model files to modules: safe loading, single-file checkpoints, Flux parts and key layouts, LoRA."""
