"""Test helpers: multi-rank CPU launches of Megatron-Core code (``multirank``)."""
