"""Write artifacts under a temporary name in their destination folder and rename when complete.

A killed run, an exception or a full disk leaves nothing under the final name: readers only
ever see a file (or folder) that was written to the end.  What lands under the final name has
the permissions a plain ``open()``/``mkdir()`` would give under the user's umask (0644 and 0755
under umask 0022), not the owner-only 0600/0700 of ``mkstemp``/``mkdtemp``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import QuantizeError

TMP_PREFIX = ".partial-"


@contextlib.contextmanager
def file_lock(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block; if another process holds it, log
    ``waiting`` and wait for it (builds of the same thing then run one after the other)."""
    import fcntl
    import logging

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger(__name__).warning("%s; waiting for it", waiting)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def umask() -> int:
    """The process's file-mode creation mask (read from /proc where the kernel shows it, else set and restored)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(is_dir: bool) -> int:
    """The mode ``mkdir()`` (``is_dir``) or ``open(..., "w")`` gives a new entry under the current umask."""
    return (0o777 if is_dir else 0o666) & ~umask()


def _check_writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QuantizeError(folder, f"the output folder is not writable: cannot create it ({exc.strerror})") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise QuantizeError(folder, "the output folder is not writable; choose another -o path")


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` if the block succeeds."""
    final = Path(final)
    _check_writable_dir(final.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
    except OSError as exc:
        raise QuantizeError(final.parent, f"the output folder is not writable ({exc.strerror}); choose another -o path") from exc
    try:
        os.fchmod(fd, plain_mode(is_dir=False))
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, plain_mode(is_dir=False))  # the block may have replaced the file
        os.replace(tmp, final)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if _disk_full(exc):
            raise QuantizeError(final, f"the disk filled up while writing it ({exc.strerror}); nothing was kept; "
                                "free space and re-run") from exc
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _plain_modes(root: Path) -> None:
    """Give everything under ``root`` the mode of a plain file or folder under the umask (an executable
    keeps its execute bits): writers such as safetensors create owner-only files."""
    files, dirs = plain_mode(is_dir=False), plain_mode(is_dir=True)
    for here, subdirs, names in os.walk(root):
        for d in subdirs:
            os.chmod(os.path.join(here, d), dirs)
        for n in names:
            path = os.path.join(here, n)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, files | (dirs & 0o111 if st.st_mode & stat.S_IXUSR else 0))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Like :func:`atomic_file` for a folder: the old folder, if any, is replaced whole."""
    final = Path(final)
    _check_writable_dir(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    except OSError as exc:
        raise QuantizeError(final.parent, f"the output folder is not writable ({exc.strerror}); choose another -o path") from exc
    try:
        os.chmod(tmp, plain_mode(is_dir=True))
        yield tmp
        _plain_modes(tmp)
        if final.exists():
            old = final.with_name(TMP_PREFIX + final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            raise QuantizeError(final, f"the disk filled up while writing it ({exc.strerror}); nothing was kept; "
                                "free space and re-run") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in bounded chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` as a hard link (no extra disk), or a copy where the filesystem cannot link; a folder is copied."""
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
