"""Hugging Face weights: ``model.safetensors``, or shards + ``model.safetensors.index.json``."""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tst_megatron.conversion import ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """``"5GB"`` (decimal units, as transformers' ``max_shard_size``), ``"2GiB"``, ``"1000"``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in _UNITS:
        raise ConversionError(f"cannot read the size {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def save_weights(
    tensors: dict[str, torch.Tensor], directory: str, dtype: torch.dtype, max_shard_bytes: int
) -> list[str]:
    """Write ``tensors`` (in order) as ``dtype``; shard when larger than ``max_shard_bytes``.

    Returns the file names written (the shards, then the index when sharded).
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    count = len(shards)
    files = (
        [SINGLE]
        if count == 1
        else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    weight_map: dict[str, str] = {}
    for names, file in zip(shards, files, strict=True):
        shard = {name: tensors[name].detach().to(dtype=dtype, copy=True) for name in names}
        path = os.path.join(directory, file)
        try:
            save_file(shard, path, metadata={"format": "pt"})
        except SafetensorError as err:  # an I/O error, reported by the Rust writer in words
            code = re.search(r"os error (\d+)", str(err))
            number = int(code.group(1)) if code else 0
            raise OSError(number, os.strerror(number) if code else str(err), path) from None
        weight_map |= dict.fromkeys(names, file)
    if count == 1:
        return files
    total = sum(t.numel() * dtype.itemsize for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return [*files, INDEX]


def load_weights(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory (single file or index + shards)."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConversionError(
                f"cannot read {index} ({type(err).__name__}: {err}): not a safetensors index "
                "with a weight_map (truncated?)"
            ) from None
    elif os.path.isfile(os.path.join(directory, SINGLE)):
        files = [SINGLE]
    else:
        raise ConversionError(
            f"{directory} holds neither {SINGLE} nor {INDEX} (only safetensors weights are "
            "read; re-save other formats with save_pretrained(safe_serialization=True))"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        path = os.path.join(directory, file)
        if not os.path.isfile(path):
            raise ConversionError(f"{index} lists {file}, which is missing")
        try:
            tensors |= load_file(path)
        except (OSError, SafetensorError) as err:
            raise ConversionError(
                f"cannot read {path}: {err} (a truncated or damaged safetensors file? "
                "download or save it again)"
            ) from None
    return tensors
