"""Prompts to embeddings: weight syntax, 77-token chunks, the text encoders."""
