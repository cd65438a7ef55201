"""Shard URL specs: expansion into lists of shards with weights, and opening one shard as a byte stream.

Syntax of a spec (``data.train_shards``)::

    spec    := source ( "::" source )*
    source  := pattern [ "@" weight ]
    pattern := a path or URL, with optional brace ranges/alternatives ("shard-{000..099}.tar",
               "{a,b}/x.tar"), and, after brace expansion, each item is one of
                 - a local folder (or ``file://`` folder): every ``*.tar`` directly inside, sorted;
                 - a local glob ("shards/*.tar"): its matches, sorted;
                 - a local file: kept (it must exist);
                 - an fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ...): kept as is; object-store URLs
                   (not http) containing ``*``, ``?`` or ``[`` are globbed, and those ending in ``/`` are
                   listed for ``*.tar``; remote shards are not checked for existence here;
                 - ``pipe:COMMAND``: the shard is the command's standard output (only with allow_pipe).
    weight  := a non-negative decimal number, the source's relative sampling weight (default 1)

Examples: ``data/train/shard-{00000..00999}.tar``, ``s3://bucket/clicks/{0000..4095}.tar@0.8::
data/img2dataset/@0.2``. Sources are chosen by weight, then a shard uniformly inside the chosen source.

The weight suffix is recognised only when what follows the last ``@`` parses as a number, so URLs
holding ``@`` (``s3://user@host/x.tar``) are left alone. ``::`` always separates sources: fsspec's
chained URLs (``simplecache::s3://...``) cannot be used.
"""
from __future__ import annotations

import glob
import io
import logging
import os
import re
import subprocess
from typing import BinaryIO, List, Tuple

import braceexpand
import fsspec

log = logging.getLogger(__name__)

PIPE_PREFIX = "pipe:"
_WEIGHT = re.compile(r"^(.*)@((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$", re.DOTALL)
_PROTOCOL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_MAGIC = re.compile(r"[*?\[]")


def _split_weight(source: str) -> Tuple[str, float]:
    m = _WEIGHT.match(source)
    if not m:
        return source, 1.0
    return m.group(1), float(m.group(2))


def _local_items(path: str, pattern: str) -> List[str]:
    """Shards of one local item: a folder, a glob or a file."""
    if os.path.isdir(path):
        found = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.endswith(".tar") and os.path.isfile(os.path.join(path, n)))
        if not found:
            raise FileNotFoundError(f"shard folder {path!r} (from {pattern!r}) holds no *.tar file")
        return found
    if glob.has_magic(path):
        found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"shard glob {path!r} (from {pattern!r}) matches no file")
        return found
    return [path]


def _remote_items(url: str, protocol: str, pattern: str) -> List[str]:
    if protocol in ("http", "https") or not (url.endswith("/") or _MAGIC.search(url.split("://", 1)[1])):
        return [url]
    fs, _ = fsspec.core.url_to_fs(url)
    target = url + "*.tar" if url.endswith("/") else url
    found = sorted(fs.unstrip_protocol(p) for p in fs.glob(target))
    if not found:
        raise FileNotFoundError(f"shard URL {target!r} (from {pattern!r}) matches nothing")
    return found


def expand_urls(spec: str, allow_pipe: bool = False) -> List[Tuple[List[str], float]]:
    """Expand a shard spec (syntax in the module docstring) into ``[(shard urls, weight), ...]``, one per source.

    Raises ValueError for a malformed spec or a ``pipe:`` URL without ``allow_pipe``, and
    FileNotFoundError when a local pattern, folder or file matches nothing.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty shard spec: give shard paths or URLs, e.g. 'data/shards/train-{000..009}.tar'")
    sources: List[Tuple[List[str], float]] = []
    for raw in spec.split("::"):
        raw = raw.strip()
        if not raw:
            raise ValueError(f"empty source in shard spec {spec!r} (two '::' in a row, or a leading/trailing '::')")
        pattern, weight = _split_weight(raw)
        if not pattern:
            raise ValueError(f"source {raw!r} of shard spec {spec!r} has a weight but no path")
        urls: List[str] = []
        missing: List[str] = []
        for item in braceexpand.braceexpand(pattern):
            if item.startswith(PIPE_PREFIX):
                if not allow_pipe:
                    raise ValueError(f"pipe: URL {item!r} refused: it runs a shell command; set allow_pipe=True "
                                     f"(config data.allow_pipe=true) if you trust the spec")
                urls.append(item)
                continue
            m = _PROTOCOL.match(item)
            if m and m.group(1) != "file":
                urls.extend(_remote_items(item, m.group(1), pattern))
                continue
            path = item[len("file://"):] if m else item
            found = _local_items(path, pattern)
            if len(found) == 1 and not os.path.isfile(found[0]):
                missing.append(found[0])
            urls.extend(found)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise FileNotFoundError(f"{len(missing)} of {len(urls)} shard(s) of {pattern!r} do not exist: "
                                    f"{', '.join(missing[:3])}{more}")
        if weight <= 0:
            log.info("source %r has weight %g: never sampled", pattern, weight)
        sources.append((urls, weight))
    if sum(w for _, w in sources) <= 0:
        raise ValueError(f"shard spec {spec!r}: the source weights sum to 0")
    return sources


class _PipeStream(io.RawIOBase):
    """The standard output of a shell command; a non-zero exit status is raised as OSError at end of data."""

    def __init__(self, command: str):
        super().__init__()
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.proc.stdout.readinto(b)
        if n == 0:
            rc = self.proc.wait()
            if rc != 0:
                raise OSError(f"pipe command {self.command!r} exited with status {rc}")
        return n

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()
            self.proc.wait()
        super().close()


def open_shard(url: str, allow_pipe: bool = False) -> BinaryIO:
    """Open one shard for reading as a binary stream (close it when done).

    Local paths and ``file://`` URLs are opened directly, ``pipe:CMD`` runs CMD through the shell and
    reads its standard output (only with ``allow_pipe``), anything else goes through fsspec.
    """
    if url.startswith(PIPE_PREFIX):
        if not allow_pipe:
            raise ValueError(f"pipe: URL {url!r} refused: set allow_pipe=True to run shell commands")
        return io.BufferedReader(_PipeStream(url[len(PIPE_PREFIX):]), buffer_size=1 << 20)
    m = _PROTOCOL.match(url)
    if not m:
        return open(url, "rb")
    if m.group(1) == "file":
        return open(url[len("file://"):], "rb")
    return fsspec.open(url, "rb").open()
