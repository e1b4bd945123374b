"""Running Megatron-Core on CPU (gloo) for tests: the CPU shim, a CPU layer spec and a
context-parallel core attention. Never used on GPUs (see ``shim.install_cpu_shim``)."""
