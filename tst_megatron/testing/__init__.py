"""What ships for checking an installation: small ``.bin/.idx`` datasets and the reference
sample reader (``datasets``, also the baseline of ``benchmarks/data_loader.py``) and the GPU
acceptance check (``gpu_check``, run by ``examples/gpu_check.sh``). The test suite's own
helpers live in ``tests/support/``."""
