"""The tar layout of a shard: reading (strict), key splitting, grouping into samples, and writing.

A sample is the run of consecutive tar members sharing a key. The key of ``dir.v2/abc.def.jpg`` is
``dir.v2/abc`` and its extension ``def.jpg``: as in webdataset, the key is everything up to the first
dot of the base name (dots in directory names are kept), extensions are lower-cased.

Why not ``tarfile`` or webdataset's reader (which is ``tarfile`` in stream mode): both take a header
block that is cut short, or a file that ends without the end-of-archive blocks, as the normal end of the
archive, so a shard truncated by a failed upload or copy reads as a shorter, valid one. Here any such
shard raises ``ShardFormatError`` (the loader and the inspector count it as ``shard_error``), and a
sample's members are only handed out once the next header (or the end-of-archive block) proved them
complete. The reader is a plain forward pass over the bytes, which is what the loader's resumable replay
needs: re-reading a shard gives the same samples in the same order. It reads ustar, GNU (long names,
base-256 sizes) and pax headers.

Writing (the builder) writes ustar headers itself, byte for byte as ``tarfile`` would, with fixed owner,
mode and mtime, so that the bytes of a shard depend only on its members; ``archive_bytes`` gives the size
of such an archive before it is written.
"""
from __future__ import annotations

import re
import tarfile
from typing import BinaryIO, Callable, Dict, Iterator, Optional, Tuple

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads an archive to a multiple of its default record size
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$", re.DOTALL)


class ShardFormatError(OSError):
    """The bytes of a shard are not a complete tar archive."""


# --------------------------------------------------------------------------------------------- reading
def _read_exact(stream: BinaryIO, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else n
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> Dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _members(stream: BinaryIO) -> Iterator[Tuple[str, Callable[[], bytes]]]:
    """Yield ``(name, read)`` per regular file as soon as its header is parsed; ``read()`` returns its data
    and must be called before the next step (so a caller learns a name before its data can fail)."""
    offset, long_name, pax = 0, None, {}

    def read_data(size: int) -> bytes:
        padded = -(-size // BLOCK) * BLOCK
        data = _read_exact(stream, padded)
        if len(data) < padded:
            raise ShardFormatError(f"truncated tar archive: member at byte {offset} needs {size} bytes, "
                                   f"{len(data)} left")
        return data[:size]

    while True:
        header = _read_exact(stream, BLOCK)
        if len(header) < BLOCK:
            what = "empty file" if offset == 0 and not header else "ends without the end-of-archive block"
            raise ShardFormatError(f"not a complete tar archive: {what} (at byte {offset + len(header)})")
        if header == bytes(BLOCK):
            return
        kind = header[156:157]
        try:
            if _number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
                raise ValueError("checksum mismatch")
            size = _number(header[124:136]) if kind in (b"x", b"g") else int(pax.get("size", _number(header[124:136])))
            if size < 0:
                raise ValueError(f"negative size {size}")
        except ValueError as e:
            raise ShardFormatError(f"corrupt tar header at byte {offset} ({e})") from None
        if kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "replace") + "/" + name
            yield pax.get("path", long_name or name), lambda: read_data(size)
            long_name, pax = None, {}
        else:
            data = read_data(size)
            if kind == b"x":
                try:
                    pax = _pax(data)
                except ValueError:
                    raise ShardFormatError(f"corrupt pax header at byte {offset}") from None
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:  # global pax, GNU long link, links, folders, devices: nothing to keep
                long_name, pax = None, {}
        offset += BLOCK + -(-size // BLOCK) * BLOCK


def split_key(name: str) -> Tuple[Optional[str], Optional[str]]:
    """``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``) as webdataset does; (None, None) without a dot."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def iter_samples(stream: BinaryIO) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Group consecutive tar members by key: yield ``(key, {extension: data})``.

    A sample is yielded once the next key's header is read (or the archive ends cleanly), so a sample
    cut by a truncation is never yielded. A repeated extension within a sample keeps the first member;
    members without an extension are ignored. Raises ShardFormatError (truncated or corrupt archive).
    """
    key, members = None, {}
    for name, read in _members(stream):
        k, ext = split_key(name)
        if k is not None and k != key:
            if members:
                yield key, members  # complete: the next key's header is read, before its data can fail
            key, members = k, {}
        data = read()
        if k is not None:
            members.setdefault(ext, data)
    if members:
        yield key, members


# --------------------------------------------------------------------------------------------- writing
def member_bytes(size: int) -> int:
    """Bytes one ustar member of ``size`` data bytes takes: a header block plus the padded data."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def archive_bytes(members_total: int) -> int:
    """Size of an archive written by ``open_writer`` whose members take ``members_total`` bytes."""
    return -(-(members_total + 2 * BLOCK) // RECORD) * RECORD


def _template() -> bytearray:
    """The ustar header ``tarfile`` writes for a regular file with fixed metadata (mode 644, owner 0, mtime 0),
    taken from ``tarfile`` itself; ``UstarWriter`` fills in the name, the size and the checksum."""
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode = 0, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))


class UstarWriter:
    """Writes the bytes ``tarfile.open(mode="w|", format=USTAR_FORMAT)`` writes for members added with fixed
    metadata, without its per-member cost (header objects, copies): the shard writer's inner loop.
    Names must fit the 100-byte name field (sample keys do)."""

    _header = None

    def __init__(self, fileobj: BinaryIO):
        self.f, self.offset = fileobj, 0
        if UstarWriter._header is None:
            UstarWriter._header = _template()

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("utf-8")
        if len(raw) > 100:
            raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
        h = bytearray(UstarWriter._header)
        h[0:100] = raw + bytes(100 - len(raw))
        h[124:136] = b"%011o\0" % len(data)
        h[148:156] = b"        "
        h[148:155] = b"%06o\0" % sum(h)
        pad = -len(data) % BLOCK
        h += data
        if pad:
            h += bytes(pad)
        self.f.write(h)
        self.offset += len(h)

    def close(self) -> None:
        end = self.offset + 2 * BLOCK
        self.f.write(bytes(2 * BLOCK + (-end % RECORD)))


def open_writer(fileobj: BinaryIO) -> UstarWriter:
    """A ustar stream writer (close it to write the end-of-archive blocks and the padding)."""
    return UstarWriter(fileobj)


def add_member(tar: UstarWriter, name: str, data: bytes) -> None:
    """One regular file with fixed metadata (mode 644, owner 0, mtime 0): the bytes depend on name and data only."""
    tar.add(name, data)
