"""Memory budget: what each stage needs on its device, the traced activation table, the pre-flight."""
