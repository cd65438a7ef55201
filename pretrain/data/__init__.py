"""The shard contract and the data paths on it.

- ``ids``: query normalisation and the stable query and image ids;
- ``tar``: strict tar reading, key splitting, samples, and the writer's layout;
- ``samples``: the sample checks and their skip reasons, image decoding, ``read_shard``;
- ``urls``: shard specs (folders, globs, braces, fsspec URLs, ``::`` sources with weights);
- ``karpathy``: the Karpathy-split JSON reader (VSE and captioning);
- ``stream``: the training and evaluation loaders (torch);
- ``build``: the shard builder (click logs -> shards; no torch).

Importing this package does not import torch: the loader's names (``ShardStream``, ``iter_eval_batches``,
``DataError``) are loaded on first use, so the builder and the inspector run without it.
"""
from .ids import image_hash, normalize_query, query_hash
from .samples import SKIP_REASONS, read_shard
from .tar import iter_samples, split_key
from .urls import expand_urls, open_shard

_STREAM_NAMES = ("DataError", "ShardStream", "iter_eval_batches")

__all__ = ["SKIP_REASONS", "DataError", "ShardStream", "expand_urls", "image_hash", "iter_eval_batches",
           "iter_samples", "normalize_query", "open_shard", "query_hash", "read_shard", "split_key"]


def __getattr__(name):
    if name in _STREAM_NAMES:
        from . import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
