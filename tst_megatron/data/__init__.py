"""Data: tokenizers, the phase-aware training token stream, validation datasets."""
