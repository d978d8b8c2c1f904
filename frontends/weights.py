"""Checkpoints as name -> lazy storage maps. Opening a checkpoint reads headers only
(safetensors) or memory-maps it (PyTorch pickles, with `weights_only=True` so no code in the
file runs); GGUF files are dequantized once, by transformers' reader."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Mapping

import torch
from tqdm.auto import tqdm

from ..ir.storage import SafetensorsStorage, Storage, TensorStorage, safetensors_header


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or disagrees with its config."""


@dataclass
class Checkpoint:
    """The tensors of a checkpoint by name, and where they came from (for messages)."""

    tensors: dict[str, Storage]
    source: str

    def get(self, name: str) -> Storage | None:
        return self.tensors.get(name)


def open_safetensors(folder: str) -> Checkpoint | None:
    """A folder's safetensors weights: `model.safetensors`, a sharded index, or every shard."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        if missing:
            raise CheckpointError(f"{index} lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                                  f"not in {folder}: the download is incomplete")
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            return None
        weight_map = {}
    tensors: dict[str, Storage] = {}
    for name in tqdm(files, desc="reading safetensors headers", unit="file", disable=len(files) < 2):
        path = os.path.join(folder, name)
        try:
            header = safetensors_header(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        for key, t in header.items():
            if weight_map and weight_map.get(key) != name:
                continue
            tensors[key] = SafetensorsStorage(path, key, t)
    absent = sorted(k for k, f in weight_map.items() if k not in tensors)
    if absent:
        raise CheckpointError(f"the index names {len(absent)} tensors its shards lack, e.g. {absent[0]!r}")
    return Checkpoint(tensors, folder)


def open_torch_pickles(paths: list[str]) -> Checkpoint:
    """PyTorch `.bin`/`.pth` files, memory-mapped and loaded with weights_only=True."""
    tensors: dict[str, Storage] = {}
    for path in tqdm(paths, desc="mapping checkpoint", unit="file", disable=len(paths) < 2):
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # the unpickler raises many types for damaged or unsafe files
            raise CheckpointError(f"cannot load {path} safely ({type(e).__name__}: {e}); kiln only reads "
                                  f"plain tensors (weights_only=True) and never runs code from a checkpoint") from None
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                tensors[key] = TensorStorage(t)
    return Checkpoint(tensors, ", ".join(paths))


def from_state_dict(module: torch.nn.Module, source: str) -> Checkpoint:
    """The tensors of a live module (no copies), including its buffers."""
    tensors: dict[str, Storage] = {k: TensorStorage(v.detach()) for k, v in module.state_dict(keep_vars=True).items()}
    for k, v in module.named_buffers():
        tensors.setdefault(k, TensorStorage(v.detach()))
    return Checkpoint(tensors, source)
