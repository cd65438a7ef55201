"""Find a font that can draw Chinese: contact sheets (tools/inspect_shards.py, tools/evaluate_retrieval.py),
demo pictures and caption attention maps.

Order: the WENLAN_CJK_FONT environment variable (a font file), `fc-list :lang=zh`, well-known CJK
font files (Noto Sans/Serif CJK, Source Han, WenQuanYi, Droid Sans Fallback) in the usual font
folders, then any .ttc/.otf/.ttf there. A font counts only if it really has a glyph for 中 (its
rendering differs from the missing-glyph box). Without one, callers warn and use PIL's default
font; on Debian/Ubuntu `apt-get install fonts-noto-cjk` provides one.
"""
from __future__ import annotations

import functools
import glob
import os
import shutil
import logging
import subprocess

from PIL import ImageFont

log = logging.getLogger(__name__)

INSTALL_HINT = "apt-get install fonts-noto-cjk"
FONT_DIRS = (
    "/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"),
    os.path.expanduser("~/.local/share/fonts"), "/Library/Fonts", "/System/Library/Fonts",
    os.path.expanduser("~/Library/Fonts"), "C:\\Windows\\Fonts",
)
PREFERRED = ("NotoSansCJK", "NotoSansSC", "SourceHanSans", "NotoSerifCJK", "SourceHanSerif", "wqy-microhei",
             "wqy-zenhei", "DroidSansFallback", "PingFang", "msyh", "simhei", "simsun", "uming", "ukai")
FONT_EXTS = (".ttc", ".otf", ".ttf")
_MAX_SCAN = 400


def covers_cjk(font) -> bool:
    """True when the font draws 中 and 国 as two different, non-empty glyphs unlike a missing glyph."""
    try:
        a = font.getmask("中")
        b = font.getmask("国")
        missing = font.getmask("\U000f0000")  # private use: a missing glyph in any normal font
    except Exception:  # noqa: BLE001
        return False
    ba, bb, bm = bytes(a), bytes(b), bytes(missing)
    if not any(ba) or ba == bb:
        return False
    return not (a.size == missing.size and ba == bm)


def _open(path: str, size: int, index: int = 0):
    try:
        return ImageFont.truetype(path, size=size, index=index)
    except Exception:  # noqa: BLE001
        return None


def _best_index(path: str) -> int | None:
    """The face of a font file (collections hold several) that covers CJK, preferring Simplified Chinese."""
    faces = []
    for index in range(12 if path.lower().endswith(".ttc") else 1):
        font = _open(path, 20, index)
        if font is None:
            break
        if covers_cjk(font):
            faces.append((index, " ".join(font.getname())))
    if not faces:
        return None
    for index, name in faces:
        if " SC" in name or "Simplified" in name or "GB" in name:
            return index
    return faces[0][0]


def _fc_list() -> list[str]:
    if not shutil.which("fc-list"):
        return []
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10).stdout
    except Exception:  # noqa: BLE001
        return []
    return [line.split(":")[0].strip() for line in out.splitlines() if line.strip()]


def _font_files() -> list[str]:
    files = []
    for d in FONT_DIRS:
        if os.path.isdir(d):
            for ext in FONT_EXTS:
                files.extend(glob.glob(os.path.join(d, "**", "*" + ext), recursive=True))
                files.extend(glob.glob(os.path.join(d, "**", "*" + ext.upper()), recursive=True))
    return sorted(set(files))


def _rank(path: str) -> tuple:
    name = os.path.basename(path)
    for i, stem in enumerate(PREFERRED):
        if stem.lower() in name.lower():
            return (i, "Bold" in name or "Black" in name or "Light" in name, name)
    return (len(PREFERRED), True, name)


@functools.lru_cache(maxsize=None)
def find_cjk_font() -> tuple[str, int] | None:
    """(font file, face index) of a font that covers Chinese, or None."""
    env = os.environ.get("WENLAN_CJK_FONT")
    if env and os.path.isfile(env):
        index = _best_index(env)
        if index is not None:
            return env, index
    candidates = sorted(set(_fc_list()), key=_rank)
    others = sorted(_font_files(), key=_rank)
    seen = set()
    for path in candidates + others[:_MAX_SCAN]:
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        index = _best_index(path)
        if index is not None:
            return path, index
    return None


@functools.lru_cache(maxsize=None)
def load_font(size: int = 14, warn: bool = True):
    """(font, covers_cjk). Falls back to PIL's default font with a warning (logged once per size)."""
    found = find_cjk_font()
    if found is not None:
        font = _open(found[0], size, found[1])
        if font is not None:
            return font, True
    if warn:
        log.warning("no font with Chinese glyphs found: Chinese text will show as boxes. Install one, e.g. "
                    "`%s` (or set WENLAN_CJK_FONT=/path/to/font.ttc).", INSTALL_HINT)
    try:
        return ImageFont.load_default(size=size), False
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default(), False
