"""Write artifacts under a temporary name in their destination folder and rename when complete.

A killed run, an exception or a full disk leaves nothing under the final name: readers only
ever see a file (or folder) that was written to the end.  What lands under the final name has
the permissions a plain ``open()``/``mkdir()`` would give under the user's umask (0644 and 0755
under umask 0022), not the owner-only 0600/0700 of ``mkstemp``/``mkdtemp``.  Temporary names
carry the writer's process id (``.partial-<name>.pid<PID>.<random>``), so the next writer of the
same output removes what a killed run left and nothing of a writer still running.

:func:`check_output` is the one check every command makes of its output path before any work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from quantize.errors import QuantizeError
from quantize.portable import lock_exclusive, proc_text

TMP_PREFIX = ".partial-"


@contextlib.contextmanager
def file_lock(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block; if another process holds it, log
    ``waiting`` and wait for it (builds of the same thing then run one after the other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            lock_exclusive(lock, wait=False)
        except BlockingIOError:
            logging.getLogger(__name__).warning("%s; waiting for it", waiting)
            lock_exclusive(lock)
        yield


def umask() -> int:
    """The process's file-mode creation mask (read from /proc where the kernel shows it, else set and restored)."""
    with contextlib.suppress(ValueError, IndexError):
        for line in (proc_text("self/status") or "").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(is_dir: bool) -> int:
    """The mode ``mkdir()`` (``is_dir``) or ``open(..., "w")`` gives a new entry under the current umask."""
    return (0o777 if is_dir else 0o666) & ~umask()


def partial_prefix(final: Path) -> str:
    """The temporary-name prefix of this process's partials of ``final``: ``.partial-<name>.pid<PID>.``."""
    return f"{TMP_PREFIX}{final.name}.pid{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(final: Path) -> list[Path]:
    """Delete the partials of ``final`` (ours by name: ``.partial-<name>.pid<PID>.<8 chars or "old">``)
    whose writing process no longer runs, e.g. after a SIGKILL; another live writer's are kept."""
    pattern = re.compile(re.escape(f"{TMP_PREFIX}{final.name}.pid") + r"(\d+)\.(?:[a-z0-9_]{8}|old)")
    removed = []
    with contextlib.suppress(OSError):
        for entry in final.parent.iterdir():
            m = pattern.fullmatch(entry.name)
            if m is None or _alive(int(m.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(out: str | Path, inputs: Iterable[str | Path | None] = (), *, folder: bool = False, flag: str = "-o") -> Path:
    """Refuse, before any work, an output path the command could not write or would destroy an input
    with: a folder where a file is written (or a file where a folder is), an input itself (by resolved
    path or by inode), a folder that holds an input, an existing file other than a ``.gguf`` inside an
    input folder (a GGUF written next to its checkpoint may be rewritten), a parent that is a file or
    not writable.  Nothing is created."""
    out = Path(out)
    if out.is_dir() and not folder:
        raise QuantizeError(out, f"is a folder; {flag} names the file to write (e.g. {out / 'model.gguf'})")
    if (out.exists() or out.is_symlink()) and folder and not out.is_dir():
        raise QuantizeError(out, f"is a file; {flag} names the folder to write, and the file would be replaced by it; "
                            "choose a folder path")
    target = out.resolve()
    for src in inputs:
        if src is None or not Path(src).exists():
            continue  # the command's own input check names a missing input
        src = Path(src)
        if src.resolve() == target or (out.exists() and os.path.samefile(src, out)):
            raise QuantizeError(out, f"is the input {src}; writing it would destroy the input; choose another {flag} path")
        if folder and src.resolve().is_relative_to(target):
            raise QuantizeError(out, f"holds the input {src}; replacing the folder would delete it; choose another {flag} path")
        if src.is_dir() and out.exists() and target.is_relative_to(src.resolve()) and target.suffix != ".gguf":
            raise QuantizeError(out, f"is a file of the input {src}; choose another {flag} path")
    check_writable_folder(out.parent, flag)
    return out


def check_writable_folder(folder: str | Path, flag: str) -> Path:
    """Refuse a folder that files are to be written into when it, or the nearest part of its path that
    exists, is a file or not writable (nothing is created)."""
    folder = Path(folder)
    parent = _nearest_existing(folder)
    where = "" if parent == Path(os.path.abspath(folder)) else f" ({parent} "
    if not parent.is_dir():
        why = f"{parent} is a file, not a folder" if where else "it is a file, not a folder"
        raise QuantizeError(folder, f"is not writable: {why}; choose another {flag} path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantizeError(folder, f"is not writable{where + 'is read-only)' if where else ''}; choose another {flag} path")
    return folder


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
    """Yield a temporary path beside ``final``, not yet created; rename what the block wrote there to
    ``final`` (with a plain file's permissions) if the block succeeds."""
    final = Path(final)
    if final.is_dir():
        raise QuantizeError(final, "is a folder; a file was to be written there; choose a file path")
    _check_writable_dir(final.parent)
    remove_stale_partials(final)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=partial_prefix(final), dir=final.parent)
    except OSError as exc:
        raise QuantizeError(final.parent, f"the output folder is not writable ({exc.strerror}); choose another -o path") from exc
    os.close(fd)
    # The random name stays ours; the file goes, so the writer creates it afresh: ext4 flushes a file
    # that an open with O_TRUNC emptied when it is closed (auto_da_alloc), 0.6 s for a 2 GB GGUF.
    os.unlink(tmp_name)
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
    if (final.exists() or final.is_symlink()) and not final.is_dir():
        raise QuantizeError(final, "is a file; a folder was to be written there; choose a folder path")
    _check_writable_dir(final.parent)
    remove_stale_partials(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(final), dir=final.parent))
    except OSError as exc:
        raise QuantizeError(final.parent, f"the output folder is not writable ({exc.strerror}); choose another -o path") from exc
    try:
        os.chmod(tmp, plain_mode(is_dir=True))
        yield tmp
        _plain_modes(tmp)
        with _dir_lock(final.parent):  # another writer of the same folder swaps before or after, not between
            if final.exists():
                old = final.with_name(partial_prefix(final) + "old")
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


@contextlib.contextmanager
def _dir_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (no lock file left behind)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        lock_exclusive(fd)
        yield
    finally:
        os.close(fd)


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
