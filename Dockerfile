# syntax=docker/dockerfile:1
# pretrain_tst.py on NVIDIA GPUs: NGC PyTorch (Python 3.12, CUDA, cuDNN, NCCL, PyTorch,
# Transformer Engine, apex) plus megatron-core 0.19 and this package: the project's primary
# environment. Build and run: docs/docker.md.
#
# NGC_TAG: 26.06-py3 is the image Megatron-Core 0.19 is tested on (Megatron-LM core_v0.19.0,
# docker/.ngc_version.dev; its LTS CI image, docker/.ngc_version.lts, is 25.09-py3). Each NGC
# PyTorch release note ("Driver Requirements", docs.nvidia.com/deeplearning/frameworks/
# pytorch-release-notes/) names its CUDA version and minimum driver; check with `nvidia-smi` on
# a compute node and take 25.09-py3 where the driver is too old for 26.06.
ARG NGC_TAG=26.06-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

# NGC's pip constraint file ($PIP_CONSTRAINT, /etc/pip/constraint.txt) pins the image's torch,
# Transformer Engine, apex and friends; it stays in force, so nothing below replaces them.
# 1. megatron-core goes in without dependencies (its only heavy one is torch, the image's) and
#    with the constraint file off for this one package: some NGC releases carry, and pin, their
#    own megatron-core, which this one replaces.
# 2. The small pure-Python dependencies (megatron-core's and ours) go in under the constraints,
#    unversioned: where the image has one, its (pinned) version stays.
# 3. This package without dependencies (pyproject.toml's markers pick megatron-core 0.19 on
#    the image's Python 3.12; the version check below fails the build otherwise).
RUN PIP_CONSTRAINT= pip install --no-cache-dir --no-deps "megatron-core>=0.19.2,<0.20" \
 && pip install --no-cache-dir numpy packaging psutil pyyaml tokenizers

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1
WORKDIR /workspace/tst-megatron
# Only what the trainer needs (no virtual environments or run outputs from the build context).
COPY pyproject.toml README.md* ./
COPY pretrain_tst.py ./
COPY tst_megatron/ tst_megatron/
COPY tools/ tools/
COPY examples/ examples/
# pyproject.toml names README.md as the long description; setuptools needs the file.
RUN test -f README.md || printf '# tst-megatron\n' > README.md \
 && pip install --no-cache-dir --no-deps -e . \
 && python -c "import sys; assert sys.version_info >= (3, 12), sys.version" \
 && python -c "from tst_megatron.mcore_compat import MCORE_VERSION as v, check_supported; \
check_supported(); assert v.startswith('0.19.'), v; print('megatron-core', v)"

CMD ["python", "pretrain_tst.py", "--help"]
