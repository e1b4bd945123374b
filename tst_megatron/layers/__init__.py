"""Layer pieces of the local (no Transformer Engine) GPT spec that run on any device."""
