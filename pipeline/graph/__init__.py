"""How work runs: the task graph, the worker, streaming, checkpoints, result health, progress, timing."""
