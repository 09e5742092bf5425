"""Content identity of inputs: what build steps and the reference cache are keyed by.

A file's sha256 is remembered by (path, size, mtime, inode) in ``sha256.json`` of the user cache
(:func:`quantize.user_cache`), so unchanged weights are hashed once; a copied or downloaded file
(new mtime) is hashed again, so keys stay content-based.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import user_cache
from .atomic import TMP_PREFIX, atomic_file, sha256_file

HASH_CACHE = user_cache() / "sha256.json"


def _key(f: Path) -> str:
    st = f.stat()
    return f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _load() -> dict[str, str]:
    try:
        return dict(json.loads(HASH_CACHE.read_text()))
    except (OSError, ValueError):
        return {}


def known_sha256(f: Path) -> str | None:
    """The remembered sha256 of ``f`` as it is now, or None (nothing is hashed)."""
    return _load().get(_key(f))


def file_key(f: Path) -> str:
    """What identifies ``f``'s content as it is now: path, size, mtime and inode."""
    return _key(f)


def remember_sha256(f: Path, digest: str, key: str | None = None) -> None:
    """Remember ``digest`` as the sha256 of ``f``, whose every byte its caller hashed; with ``key``
    (:func:`file_key` taken before the bytes were read), only if the file is still as it was then."""
    now = _key(f)
    if key is not None and key != now:
        return
    cache = _load()
    if cache.get(now) != digest:
        cache[now] = digest
        HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(HASH_CACHE) as tmp:
            tmp.write_text(json.dumps(cache))


def cached_sha256(f: Path) -> str:
    """The sha256 of ``f``: remembered, or computed and remembered."""
    known = known_sha256(f)
    if known is None:
        key = _key(f)
        known = sha256_file(f)
        remember_sha256(f, known, key)
    return known


def fingerprint(path: Path) -> str:
    """Content identity of an input file or folder (names and sha256 of every file, partial files left out)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(TMP_PREFIX))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}:{cached_sha256(f)};".encode())
    return h.hexdigest()
