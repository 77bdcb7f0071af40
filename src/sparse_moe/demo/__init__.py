"""The built-in demo: synthetic multi-domain corpus -> tokenizer -> shards -> MoE vs dense."""
