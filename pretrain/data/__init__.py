"""Training and evaluation data: WebDataset shards streamed through fsspec (see ``stream`` and ``urls``)."""
from .samples import SKIP_REASONS, image_hash, iter_samples, normalize_query, query_hash, split_key
from .stream import DataError, ShardStream, iter_eval_batches
from .urls import expand_urls, open_shard

__all__ = ["SKIP_REASONS", "DataError", "ShardStream", "expand_urls", "image_hash", "iter_eval_batches",
           "iter_samples", "normalize_query", "open_shard", "query_hash", "split_key"]
