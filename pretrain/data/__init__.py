"""Training and evaluation data: WebDataset shards streamed through fsspec (see ``stream`` and ``urls``).

Names are imported on first use, so that ``pretrain.data.urls`` (path checks before start-up) does not
import torch."""
import importlib

_WHERE = {"SKIP_REASONS": "samples", "image_hash": "samples", "iter_samples": "samples", "normalize_query": "samples",
          "query_hash": "samples", "split_key": "samples", "DataError": "stream", "ShardStream": "stream",
          "iter_eval_batches": "stream", "expand_urls": "urls", "open_shard": "urls"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
