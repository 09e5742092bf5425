"""The operating-system calls the package makes beyond portable Python, each chosen by what the
running system offers (an attribute present, a call that succeeds), never by the platform's name.

Linux's kernel calls are used where they exist and work; elsewhere (macOS, a filesystem or a
container that refuses them) a portable equivalent gives the same bytes:

* :func:`copy_range`: ``copy_file_range``, else ``sendfile`` to a regular file, else ``pread`` and
  ``pwrite`` in chunks of :data:`COPY_CHUNK` bytes.
* :func:`lower_this_thread`: ``SCHED_IDLE``, else the lowest nice level of the thread (Linux), else
  the background band of a Darwin thread, else nothing.
* :func:`unnamed_file`: ``O_TMPFILE``, else a ``mkstemp`` file whose name is removed at once.
* :func:`release_pages`: ``madvise(MADV_DONTNEED)``, else nothing.
* :func:`reserve_space`: ``posix_fallocate``, else a check of the filesystem's free space (``fstatvfs``).
* :func:`proc_text`: a file under ``/proc``, else None.
* :func:`lock_exclusive`: ``flock``.  Where ``fcntl`` is missing (Windows), :func:`unsupported_platform`
  says so and the command line stops at start.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from quantize.errors import QuantizeError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

COPY_CHUNK = 8 << 20  # bytes read and written per step of the portable copy
PROC = Path("/proc")

# Errors by which a kernel copy call says it cannot copy between these two files (another filesystem,
# a kernel or a container without the call; for sendfile, an output that is not a socket, which macOS
# and the BSDs report as ENOTSOCK or EBADF): the next way is tried, and an error that was not a refusal
# comes back from it.  Any other error (a full disk, an I/O error) is raised.
_COPY_REFUSED = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM})
_SENDFILE_REFUSED = _COPY_REFUSED | {errno.ENOTSOCK, errno.EBADF}


def copy_range(src: int, dst: int, src_at: int, dst_at: int, n: int) -> None:
    """Copy ``n`` bytes of the file ``src`` from offset ``src_at`` to the file ``dst`` at offset
    ``dst_at``: by ``os.copy_file_range`` where present and accepted, else by ``os.sendfile`` (``dst``'s
    position is moved), else by :func:`copy_by_reads`.  Raises OSError(EIO) if ``src`` ends early."""
    if (kernel_copy := getattr(os, "copy_file_range", None)) is not None:
        src_at, dst_at, n = _copy_while_accepted(lambda s, d, k: kernel_copy(src, dst, k, s, d), _COPY_REFUSED, src_at, dst_at, n)
    if n > 0 and (send := getattr(os, "sendfile", None)) is not None:
        os.lseek(dst, dst_at, os.SEEK_SET)
        src_at, dst_at, n = _copy_while_accepted(lambda s, d, k: send(dst, src, s, k), _SENDFILE_REFUSED, src_at, dst_at, n)
    if n > 0:
        copy_by_reads(src, dst, src_at, dst_at, n)


def _copy_while_accepted(step: Callable[[int, int, int], int], refused: frozenset[int], src_at: int, dst_at: int,
                         n: int) -> tuple[int, int, int]:
    """Call ``step(src_at, dst_at, count)`` (it returns the bytes it copied) until ``n`` bytes are copied
    or it fails with an errno in ``refused``; the source offset, destination offset and count left."""
    while n > 0:
        try:
            done = step(src_at, dst_at, n)
        except OSError as e:
            if e.errno not in refused:
                raise
            break
        if done <= 0:
            raise OSError(errno.EIO, f"copied no bytes at offset {src_at}: the source file shrank")
        src_at, dst_at, n = src_at + done, dst_at + done, n - done
    return src_at, dst_at, n


def copy_by_reads(src: int, dst: int, src_at: int, dst_at: int, n: int, chunk: int = COPY_CHUNK) -> None:
    """Copy ``n`` bytes from ``src`` at ``src_at`` to ``dst`` at ``dst_at`` with ``os.pread`` and
    ``os.pwrite``, at most ``chunk`` bytes held at a time; neither file's position moves."""
    while n > 0:
        data = os.pread(src, min(n, chunk), src_at)
        if not data:
            raise OSError(errno.EIO, f"copied no bytes at offset {src_at}: the source file shrank")
        view = memoryview(data)
        while view:
            written = os.pwrite(dst, view, dst_at)
            view, dst_at = view[written:], dst_at + written
        src_at, n = src_at + len(data), n - len(data)


def lower_this_thread() -> str:
    """Lower the calling thread's CPU priority and return how: ``"idle"`` (Linux ``SCHED_IDLE``: it runs
    only on cores nothing else wants), ``"nice"`` (nice 19 of this thread, where ``SCHED_IDLE`` is
    refused), ``"background"`` (the background band of a Darwin thread) or ``"unchanged"``."""
    idle = getattr(os, "SCHED_IDLE", None)
    set_scheduler = getattr(os, "sched_setscheduler", None)
    if idle is not None and set_scheduler is not None:
        try:
            set_scheduler(0, idle, os.sched_param(0))  # 0: this thread, not the process
            return "idle"
        except OSError:
            try:  # where a thread's id names it to setpriority, as on Linux
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
                return "nice"
            except (AttributeError, OSError):
                return "unchanged"
    darwin_thread, darwin_bg = getattr(os, "PRIO_DARWIN_THREAD", None), getattr(os, "PRIO_DARWIN_BG", None)
    if darwin_thread is not None and darwin_bg is not None:
        try:
            os.setpriority(darwin_thread, 0, darwin_bg)  # 0: the calling thread
            return "background"
        except OSError:
            pass
    return "unchanged"


def unnamed_file(folder: str | Path | None = None, prefix: str = "tmp", suffix: str = "") -> IO[bytes]:
    """A new empty file opened ``w+b`` in ``folder`` (default: the system's temporary folder) that no name
    refers to, so it is gone once closed: opened with ``O_TMPFILE`` where the system has it and the
    filesystem accepts it (never named), else created by ``mkstemp`` (``prefix``, ``suffix``) and
    unlinked at once."""
    where = os.fspath(folder) if folder is not None else tempfile.gettempdir()
    flag = getattr(os, "O_TMPFILE", None)
    if flag is not None:
        try:
            fd = os.open(where, os.O_RDWR | flag, 0o600)
        except OSError:  # a filesystem without it (EOPNOTSUPP), a kernel that reads it as O_DIRECTORY (EISDIR)
            pass
        else:
            return open(fd, "w+b")  # noqa: SIM115 - the caller closes it
    fd, name = tempfile.mkstemp(suffix, prefix, where)
    try:
        os.unlink(name)
        return open(fd, "w+b")  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise


def release_pages(mm: mmap.mmap, start: int, length: int) -> bool:
    """Drop the pages of ``mm``'s ``[start, start + length)`` (``start`` page-aligned) from this
    process's resident set with ``madvise(MADV_DONTNEED)``; False, and nothing done, where mmap lacks
    either."""
    advise, dont_need = getattr(mm, "madvise", None), getattr(mmap, "MADV_DONTNEED", None)
    if advise is None or dont_need is None:
        return False
    advise(dont_need, start, length)
    return True


# Errors by which posix_fallocate says the filesystem does not implement it (ZFS, some network and
# FUSE filesystems): the free-space check is used instead.
_FALLOCATE_REFUSED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def reserve_space(fd: int, size: int, where: str | Path) -> None:
    """Give the open file ``fd`` (named ``where`` in the error) disk blocks for its first ``size`` bytes
    before it is written through a memory map, where a full disk is otherwise a SIGBUS at the first page
    the map cannot back: ``os.posix_fallocate`` where present and accepted, else the filesystem's free
    space (``os.fstatvfs``) is compared with the bytes still to be written.  Raises
    :class:`QuantizeError` naming ``where`` when the disk cannot hold them."""
    have = os.fstat(fd).st_size
    if (fallocate := getattr(os, "posix_fallocate", None)) is not None:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as err:
            if err.errno not in _FALLOCATE_REFUSED:
                _no_room(err, where, size, None)
    st = os.fstatvfs(fd)
    free = st.f_bavail * st.f_frsize
    if size - have > free:
        _no_room(None, where, size, free)


def _no_room(err: OSError | None, where: str | Path, size: int, free: int | None) -> None:
    if err is not None and err.errno != errno.ENOSPC:
        raise err
    told = "" if free is None else f", {free / 2**30:.2f} GiB free"
    raise QuantizeError(where, f"no room on its disk for {size / 2**30:.2f} GiB{told}; free space there, "
                        "or set TMPDIR / --artifacts to a disk with room") from err


def proc_text(name: str) -> str | None:
    """The text of ``/proc/<name>``, or None where it cannot be read (a system without ``/proc``)."""
    try:
        return (PROC / name).read_text()
    except OSError:
        return None


def lock_exclusive(fd: Any, wait: bool = True) -> None:
    """Take an exclusive ``flock`` on the open file ``fd`` (a descriptor or file object), waiting for
    another holder, or raising BlockingIOError when ``wait`` is false and another process holds it."""
    if fcntl is None:
        raise OSError(errno.ENOSYS, "file locking (fcntl.flock) is not available on this system")
    fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)


def unsupported_platform() -> str | None:
    """Why this system cannot run the package (no ``fcntl`` module, no ``os.pread``/``os.pwrite``:
    Windows), or None."""
    if fcntl is None or not hasattr(os, "pread") or not hasattr(os, "pwrite"):
        return "Windows is not supported (no POSIX fcntl/pread); use WSL2 (Linux) or macOS"
    return None
