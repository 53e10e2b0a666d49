"""Data: WebDataset shards from LLaVA / DPO / MMPR sources, templates, packing, the resumable loader.

    build_shards(kind, input, out, image_root, BuildOptions(...))     # pivot-mega data build-shards
    loader = PackedDataLoader(load_data_config(...), image_size=384, num_image_tokens=576,
                              image_token_id=151655, rank=rank, world_size=world_size)
    for batch in loader: ...                                          # a batch.MicroBatch each
    state = loader.state_dict(); loader.load_state_dict(state)       # exact resume

Submodules import lazily, so building shards does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "config", "load_data_config": "config",
    "DataError": "sources", "Skip": "sources",
    "BuildOptions": "shard_builder", "build_shards": "shard_builder", "summarize": "shard_builder",
    "ShardSet": "shards",
    "TextEncoder": "templates", "IGNORE_INDEX": "templates",
    "pack_rows": "packing", "plan_window": "packing",
    "PackedDataLoader": "loader", "DataCounters": "loader",
    "make_image_decoder": "images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
