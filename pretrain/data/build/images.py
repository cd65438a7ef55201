"""Images of the builder: read the bytes behind a reference, examine them once (plan), render them (write).

Every distinct image reference is fetched, hashed, decoded (``pretrain.data.samples.decode_image``, the
loader's decoder), checked and encoded once while planning, whatever the number of pairs that use it;
the JPEG is kept in the build's work folder under the SHA-1 of the source bytes and the shards are
written from there. Only when that cache is gone (removed after a finished build, then a shard deleted
by hand) does writing fetch and encode again: it checks the content hash against the plan and the JPEG
size (the encoder is deterministic), so a resumed build still writes byte-identical shards. Both run in
worker processes or Spark executors: the functions take and return small picklable tuples.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
import uuid

import fsspec
from PIL import Image

from ..ids import image_hash
from ..samples import decode_image
from .inputs import Base64Error, b64decode, is_url

IMAGE_REASONS = ("bad_base64", "unreadable_image", "undecodable_image")
"""Bad-input reasons of a row whose image cannot be used."""


def read_image_bytes(ref: str, retries: int = 3) -> bytes:
    """Raw bytes of a resolved reference. Base64Error for bad base64, OSError-likes otherwise."""
    if ref.startswith("base64:"):
        return b64decode(ref[7:])
    if is_url(ref):
        for attempt in range(retries):
            try:
                with fsspec.open(ref, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                raise
            except Exception:  # noqa: BLE001 - network errors are retried
                if attempt == retries - 1:
                    raise
                time.sleep(0.5 * 2 ** attempt)
    with open(ref, "rb") as f:
        return f.read()


def resize_image(im: Image.Image, size: int, mode: str) -> Image.Image:
    """Keep the aspect ratio; only shrink; size 0 = unchanged. ``mode``: the longest or shortest side."""
    if size <= 0:
        return im
    w, h = im.size
    side = max(w, h) if mode == "longest" else min(w, h)
    if side <= size:
        return im
    scale = size / side
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(new, Image.Resampling.LANCZOS)


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def cache_path(cache_dir: str, sha1: str) -> str:
    """Where the planned JPEG of an image content lies while a build runs (``OUT/_work/jpg/ab/abcdef....jpg``)."""
    return f"{cache_dir}/{sha1[:2]}/{sha1}.jpg"


def _put(url: str, data: bytes) -> None:
    """Write ``data`` at ``url`` atomically (a unique temporary name, then a rename): two workers writing the
    same content (two references to the same bytes) cannot leave a torn file."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


IMAGE_FIELDS = ("ref", "status", "sha1", "image_id", "w", "h", "sw", "sh", "jpg_size", "encoded", "message")
"""The columns of the images table (one row per distinct reference) that ``examine_image`` fills."""


def examine_image(task):
    """Plan (in a worker or a Spark executor): fetch, hash, decode, check and encode one reference, once.

    ``task``: (ref, resize, resize_mode, jpeg_quality, min_side, max_aspect, cache_dir). The JPEG is kept
    in ``cache_dir`` under its content hash, so that writing the shards encodes nothing again. Returns a
    tuple of ``IMAGE_FIELDS``: status "ok" or a bad reason; stored sizes and ``jpg_size`` 0 when the image
    is filtered anyway (not encoded). ``image_id`` is ``ids.image_hash`` of the bytes read: the id the
    loader gives the same file in a folder without ids.
    """
    ref, resize, mode, quality, min_side, max_aspect, cache_dir = task
    try:
        data = read_image_bytes(ref)
    except Base64Error as e:
        return (ref, "bad_base64", None, None, None, None, None, None, None, 0, str(e)[:200])
    except Exception as e:  # noqa: BLE001 - any read failure is a counted bad row
        return (ref, "unreadable_image", None, None, None, None, None, None, None, 0, f"{type(e).__name__}: {e}"[:200])
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        im = decode_image(data)
    except Exception as e:  # noqa: BLE001
        return (ref, "undecodable_image", None, None, None, None, None, None, None, 0,
                f"{type(e).__name__}: {e}"[:200])
    w, h = im.size
    if min(w, h) < min_side or (max_aspect > 0 and max(w, h) / max(1, min(w, h)) > max_aspect):
        return (ref, "ok", sha1, image_hash(data), w, h, 0, 0, 0, 0, None)  # filtered later: not encoded
    out = resize_image(im, resize, mode)
    jpg = encode_jpeg(out, quality)
    if cache_dir:
        _put(cache_path(cache_dir, sha1), jpg)
    return (ref, "ok", sha1, image_hash(data), w, h, out.size[0], out.size[1], len(jpg), 1, None)


class JpegCache:
    """Reads the planned JPEGs from ``cache_dir`` (the filesystem resolved once), keeping up to ``max_bytes``
    of them in memory: a shard uses an image once per pair."""

    def __init__(self, cache_dir: str, max_bytes: int = 64 << 20):
        self.fs, self.root = fsspec.core.url_to_fs(cache_dir) if cache_dir else (None, None)
        self.local = self.fs is not None and "file" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list))
                                                        else (self.fs.protocol,))
        self.max_bytes, self.bytes, self.held = max_bytes, 0, {}

    def get(self, sha1: str, size: int):
        """The planned JPEG, or None when the cache lacks it (then ``render_image`` makes it again)."""
        data = self.held.get(sha1)
        if data is not None:
            return data
        if self.fs is None:
            return None
        path = cache_path(self.root, sha1)
        try:
            if self.local:
                with open(path, "rb") as f:
                    data = f.read()
            else:
                data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        if len(data) != size:
            return None
        if self.bytes + size > self.max_bytes:
            self.held.clear()
            self.bytes = 0
        self.held[sha1] = data
        self.bytes += size
        return data


def render_image(task):
    """Write, when the cache lacks an image (a re-run after the cache was removed): ``("ok", JPEG bytes)``
    of one sample, checked against the plan, or ``("error", why)``.

    ``task``: (ref, sha1, jpeg_bytes, resize, resize_mode, jpeg_quality)."""
    ref, sha1, size, resize, mode, quality = task
    try:
        data = read_image_bytes(ref)
        if hashlib.sha1(data).hexdigest() != sha1:
            return ("error", f"image changed since the plan was made: {ref[:200]}")
        jpg = encode_jpeg(resize_image(decode_image(data), resize, mode), quality)
    except Exception as e:  # noqa: BLE001
        return ("error", f"{type(e).__name__}: {e} ({ref[:200]})")
    if len(jpg) != size:
        return ("error", f"re-encoded JPEG has {len(jpg)} bytes, the plan says {size} "
                         f"(another Pillow/libjpeg than the planning run?): {ref[:200]}")
    return ("ok", jpg)
