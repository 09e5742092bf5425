"""Content identity of inputs: what build steps and the reference cache are keyed by.

A file's sha256 is remembered by (path, size, mtime, inode) in ``sha256.json`` of the user cache
(:func:`quantize.user_cache`), so unchanged weights are hashed once; a copied or downloaded file
(new mtime) is hashed again, so keys stay content-based.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path

from quantize import user_cache
from quantize.atomic import TMP_PREFIX, atomic_file, sha256_file
from quantize.portable import lower_this_thread

HASH_CACHE = user_cache() / "sha256.json"


def file_key(f: Path) -> str:
    """What identifies ``f``'s content as it is now: path, size, mtime and inode."""
    return _key_of(str(f.resolve()), f.stat())


def _key_of(resolved: str, st: os.stat_result) -> str:
    return f"{resolved}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _load() -> dict[str, str]:
    try:
        return dict(json.loads(HASH_CACHE.read_text()))
    except (OSError, ValueError):
        return {}


def remembered(keys: list[str]) -> list[str | None]:
    """The remembered sha256 under each :func:`file_key`, or None (nothing is hashed)."""
    cache = _load()
    return [cache.get(k) for k in keys]


def known_sha256(f: Path) -> str | None:
    """The remembered sha256 of ``f`` as it is now, or None."""
    return remembered([file_key(f)])[0]


def remember_sha256s(hashed: list[tuple[Path, str, str]]) -> None:
    """Remember ``(file, sha256, key)`` entries, whose every byte their caller hashed, each only if the
    file is still as its :func:`file_key` ``key`` (taken before the bytes were read) says."""
    cache = _load()
    fresh = {key: digest for f, digest, key in hashed if file_key(f) == key and cache.get(key) != digest}
    if fresh:
        HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(HASH_CACHE) as tmp:
            tmp.write_text(json.dumps({k: v for k, v in cache.items() if _still(k)} | fresh))


def _still(key: str) -> bool:
    """Whether the file a remembered key names is still as the key says (entries of files since
    changed or removed are dropped whenever the cache is written, so it does not grow without end)."""
    path = key.rsplit(":", 3)[0]  # already resolved
    try:
        return _key_of(path, os.stat(path)) == key
    except (OSError, ValueError):
        return False


def cached_sha256(f: Path) -> str:
    """The sha256 of ``f``: remembered, or computed and remembered."""
    key = file_key(f)
    known = remembered([key])[0]
    if known is None:
        known = sha256_file(f)
        remember_sha256s([(f, known, key)])
    return known


def sha256_when_idle(f: Path) -> Future[str]:
    """:func:`cached_sha256` of ``f`` on a thread of the lowest priority the system gives
    (:func:`quantize.portable.lower_this_thread`; Linux: the idle scheduling class): it takes the time
    the work it runs beside leaves idle (a quantizer's single-threaded reads and writes), and the
    rest once that work is done."""
    done: Future[str] = Future()

    def run() -> None:
        try:
            lower_this_thread()
            done.set_result(cached_sha256(f))
        except BaseException as exc:  # handed to whoever waits for the digest
            done.set_exception(exc)

    threading.Thread(target=run, name=f"sha256 {f.name}", daemon=True).start()
    return done


def fingerprint(path: Path) -> str:
    """Content identity of an input file or folder (names and sha256 of every file, partial files left out)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(TMP_PREFIX))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}:{cached_sha256(f)};".encode())
    return h.hexdigest()
