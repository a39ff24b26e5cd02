"""Library: load a base encoder, LoRA per architecture family, prompts, tokens, the fastest verified encoder forms."""
