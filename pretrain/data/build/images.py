"""Images of the builder: read the bytes behind a reference, examine them once (plan), render them (write).

Every distinct image reference is read, hashed, decoded (``pretrain.data.samples.decode_image``, the
loader's decoder), checked and encoded once while planning; writing reads it again, checks that its
content hash is the planned one, and encodes it again to the planned number of bytes (the encoder is
deterministic), so that a resumed build writes byte-identical shards. Both run in worker processes:
the functions take and return small picklable tuples.
"""
from __future__ import annotations

import hashlib
import io
import time

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


def examine_image(task):
    """Plan (in a worker): read, hash, decode, check, encode one reference.

    ``task``: (ref, resize, resize_mode, jpeg_quality, min_side, max_aspect). Returns
    ``("ok", sha1, image_id, width, height, stored_width, stored_height, jpeg_bytes)`` (stored sizes 0 when
    the image will be filtered) or ``(bad reason, message)``. ``image_id`` is ``ids.image_hash`` of the
    bytes read: the id the loader gives the same file in a folder without ids.
    """
    ref, resize, mode, quality, min_side, max_aspect = task
    try:
        data = read_image_bytes(ref)
    except Base64Error as e:
        return ("bad_base64", str(e)[:200])
    except Exception as e:  # noqa: BLE001 - any read failure is a counted bad row
        return ("unreadable_image", f"{type(e).__name__}: {e}"[:200])
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        im = decode_image(data)
    except Exception as e:  # noqa: BLE001
        return ("undecodable_image", f"{type(e).__name__}: {e}"[:200])
    w, h = im.size
    if min(w, h) < min_side or (max_aspect > 0 and max(w, h) / max(1, min(w, h)) > max_aspect):
        return ("ok", sha1, image_hash(data), w, h, 0, 0, 0)  # filtered later: no need to encode
    out = resize_image(im, resize, mode)
    jpg = encode_jpeg(out, quality)
    return ("ok", sha1, image_hash(data), w, h, out.size[0], out.size[1], len(jpg))


def render_image(task):
    """Write (in a worker): ``("ok", JPEG bytes)`` of one sample, checked against the plan, or ``("error", why)``.

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
