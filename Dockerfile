# syntax=docker/dockerfile:1
# pretrain_tst.py on NVIDIA GPUs: NGC PyTorch (CUDA, cuDNN, NCCL, PyTorch, Transformer Engine,
# apex) plus megatron-core 0.16 and this package. Build and run: docs/docker.md.
#
# NGC_TAG: take the newest release whose driver requirement your cluster meets. Each NGC
# PyTorch release note ("Driver Requirements", docs.nvidia.com/deeplearning/frameworks/
# pytorch-release-notes/) names its CUDA version and minimum driver; B200/GB200 need a CUDA
# 12.8+ release (25.01 or later). Check with `nvidia-smi` on a compute node.
ARG NGC_TAG=25.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

# The image's torch, Transformer Engine and apex stay as they are: megatron-core goes in
# without dependencies (its only heavy one is torch), then the small pure-Python ones. Some NGC
# releases carry their own megatron-core; this project is written against 0.16.x, so it is
# pinned here and replaces that one.
RUN pip install --no-cache-dir --no-deps "megatron-core~=0.16.1" \
 && pip install --no-cache-dir "packaging>=24.2" psutil pyyaml tokenizers

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
 && pip install --no-cache-dir --no-deps -e .

CMD ["python", "pretrain_tst.py", "--help"]
