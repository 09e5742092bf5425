"""Every Linux-only call the package makes has a portable way, taken when the call is missing or
refused: here each call is hidden (as on macOS) and the result must be the same bytes."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MakeTemp

import quantize.fingerprint as fingerprint
import quantize.gate_kernel as gk
from quantize import portable
from quantize.atomic import plain_mode, umask
from quantize.cli import main
from quantize.convert import convert
from quantize.errors import QuantizeError
from quantize.formats.gguf_split import split_gguf
from quantize.models.demo import Demo

LINUX_ONLY = ("copy_file_range", "sendfile", "sched_setscheduler", "O_TMPFILE", "posix_fallocate")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _spy(mp: pytest.MonkeyPatch, owner: Any, name: str, seen: list[Any], record: Callable[..., Any] = lambda *a, **k: a) -> None:
    """Replace ``owner.name`` by a wrapper that appends ``record(*args)`` to ``seen`` and calls the original."""
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(record(*args, **kwargs))
        return real(*args, **kwargs)

    mp.setattr(owner, name, wrapper)


def hide_linux_calls(mp: pytest.MonkeyPatch, nowhere: Path) -> Counter[str]:
    """Hide ``copy_file_range``, ``sendfile``, ``sched_setscheduler``, ``O_TMPFILE``, ``MADV_DONTNEED`` and
    ``/proc``; count the bytes the portable copy moves and how each thread was lowered."""
    for name in LINUX_ONLY:
        mp.delattr(os, name, raising=False)
    mp.setattr(tempfile, "_O_TMPFILE_WORKS", False, raising=False)  # the stdlib's own O_TMPFILE check, made at import
    mp.delattr(mmap, "MADV_DONTNEED", raising=False)
    mp.setattr(portable, "PROC", nowhere / "no-proc")
    taken: Counter[str] = Counter()
    real_copy, real_lower = portable.copy_by_reads, portable.lower_this_thread

    def copy_by_reads(src: int, dst: int, src_at: int, dst_at: int, n: int, chunk: int = portable.COPY_CHUNK) -> None:
        taken["bytes copied by reads"] += n
        real_copy(src, dst, src_at, dst_at, n, chunk)

    def lower() -> str:
        how = real_lower()
        taken[f"thread {how}"] += 1
        return how

    mp.setattr(portable, "copy_by_reads", copy_by_reads)
    mp.setattr(fingerprint, "lower_this_thread", lower)
    return taken


# --- the commands, with every Linux-only call hidden ----------------------------------------------


def test_convert_without_linux_calls_writes_the_same_bytes(demo: Demo, spm_f16: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    taken = hide_linux_calls(monkeypatch, tmp_path)
    out = convert(demo.spm, tmp_path / spm_f16.name).path
    assert _sha256(out) == _sha256(spm_f16)
    assert taken["bytes copied by reads"] > out.stat().st_size // 2  # the float16 tensors, copied as stored
    assert stat.S_IMODE(out.stat().st_mode) == plain_mode(is_dir=False)


@pytest.fixture(scope="module")
def imatrix(demo: Demo, module_mktemp: MakeTemp) -> Path:
    from quantize.imatrix import ImatrixSettings, compute_imatrix

    return compute_imatrix(demo.spm, demo.text["calib"], ImatrixSettings(ctx=128, chunks=4)).save(
        module_mktemp("portable-im") / "im.gguf")


def _smooth_and_quantize(spm_f16: Path, imatrix: Path, out: Path, mp: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """What ``quantize smooth`` and ``quantize gguf --smooth --type Q4_K_M`` write, the input's sha256
    hashed anew (on the lowered thread) into a fresh cache."""
    from quantize.gguf_quant import QuantizeSettings, quantize_gguf
    from quantize.smooth import smooth_gguf

    out.mkdir()
    mp.setattr(fingerprint, "HASH_CACHE", out / "sha256.json")
    smooth_gguf(spm_f16, imatrix, out / "s.F16.gguf", out / "s.imatrix.gguf")
    q = quantize_gguf(spm_f16, out / "q.Q4_K_M.gguf", QuantizeSettings("Q4_K_M", imatrix, threads=2, smooth=True))
    return out / "s.F16.gguf", out / "s.imatrix.gguf", q


def test_smoothing_without_linux_calls_writes_the_same_bytes(spm_f16: Path, imatrix: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as mp:
        seen: list[str] = []
        _spy(mp, fingerprint, "lower_this_thread", seen)
        normal = _smooth_and_quantize(spm_f16, imatrix, tmp_path / "normal", mp)
    taken = hide_linux_calls(monkeypatch, tmp_path)
    hidden = _smooth_and_quantize(spm_f16, imatrix, tmp_path / "hidden", monkeypatch)
    for a, b in zip(normal, hidden, strict=True):
        assert _sha256(a) == _sha256(b), b.name
    assert seen, "the quantizer did not hash its input on a lowered thread"
    assert taken["bytes copied by reads"] > 0  # the smoothed F16's unscaled tensors
    assert sum(v for k, v in taken.items() if k.startswith("thread ")) == 1 and not taken["thread idle"]


def test_split_without_linux_calls_writes_the_same_shards(spm_f16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = int(spm_f16.stat().st_size * 0.6)
    normal = split_gguf(spm_f16, tmp_path / "normal", limit)
    taken = hide_linux_calls(monkeypatch, tmp_path)
    hidden = split_gguf(spm_f16, tmp_path / "hidden", limit)
    assert len(hidden) >= 2 and [p.name for p in hidden] == [p.name for p in normal]
    for a, b in zip(normal, hidden, strict=True):
        assert _sha256(a) == _sha256(b), b.name
    assert taken["bytes copied by reads"] > spm_f16.stat().st_size // 2


# --- copy_range: each way, the same bytes ---------------------------------------------------------


def _refuse(code: int) -> Callable[..., int]:
    def call(*args: Any) -> int:
        raise OSError(code, os.strerror(code))

    return call


# way -> (calls hidden, calls refused with an errno)
WAYS: dict[str, tuple[tuple[str, ...], dict[str, int]]] = {
    "as is": ((), {}),
    "copy_file_range refused (EXDEV)": ((), {"copy_file_range": errno.EXDEV}),
    "no copy_file_range": (("copy_file_range",), {}),
    "sendfile only to sockets (ENOTSOCK)": (("copy_file_range",), {"sendfile": errno.ENOTSOCK}),
    "neither call": (("copy_file_range", "sendfile"), {}),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_copy_range_gives_the_same_bytes_every_way(way: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """21 MiB and an odd byte count from an odd offset into the middle of a file: the bytes around the
    range are kept, the range is exact, and the portable copy holds at most COPY_CHUNK bytes at a time."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (21 << 20) + 12345, dtype=np.uint8).tobytes()
    (tmp_path / "src").write_bytes(data)
    before = rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "dst").write_bytes(before)
    src_at, dst_at, n = 4097, 1 << 20, len(data) - 4097 - 5
    hidden, refused = WAYS[way]
    for name in hidden:
        monkeypatch.delattr(os, name, raising=False)
    for name, code in refused.items():
        monkeypatch.setattr(os, name, _refuse(code), raising=False)
    reads: list[int] = []
    _spy(monkeypatch, os, "pread", reads, lambda fd, size, at: size)
    src, dst = os.open(tmp_path / "src", os.O_RDONLY), os.open(tmp_path / "dst", os.O_RDWR)
    try:
        portable.copy_range(src, dst, src_at, dst_at, n)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == before[:dst_at] + data[src_at:src_at + n]
    if way in ("neither call", "sendfile only to sockets (ENOTSOCK)"):
        assert sum(reads) == n  # every byte by the portable copy
    elif hasattr(os, "copy_file_range"):  # Linux (as is; else sendfile, which Linux gives regular files)
        assert not reads
    assert max(reads, default=0) <= portable.COPY_CHUNK


def test_copy_range_raises_what_is_not_a_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk is not taken for a call the system lacks; a source that ends early is an error."""
    (tmp_path / "src").write_bytes(b"x" * 1000)
    src, dst = os.open(tmp_path / "src", os.O_RDONLY), os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    try:
        with monkeypatch.context() as mp:
            mp.setattr(os, "copy_file_range", _refuse(errno.ENOSPC), raising=False)
            mp.setattr(os, "sendfile", _refuse(errno.ENOSPC))
            with pytest.raises(OSError) as e:
                portable.copy_range(src, dst, 0, 0, 1000)
            assert e.value.errno == errno.ENOSPC
        for name in ("copy_file_range", "sendfile"):
            monkeypatch.delattr(os, name, raising=False)
        with pytest.raises(OSError, match="the source file shrank") as e:
            portable.copy_range(src, dst, 0, 0, 2000)
        assert e.value.errno == errno.EIO
    finally:
        os.close(src)
        os.close(dst)


# --- the activations' spill file without O_TMPFILE ------------------------------------------------


def _spill_round_trip(folder: Path) -> np.ndarray:
    import torch

    from quantize.engine.stream import Activations

    acts = Activations(3, 4, 8, torch.float32, spill=True, spill_dir=folder)
    try:
        assert list(folder.iterdir()) == []  # no name in the folder while it is in use
        value = torch.linspace(-3, 3, 2 * 4 * 8).reshape(2, 4, 8)
        acts.set(slice(1, 3), value)
        got = acts.get(slice(0, 3), "cpu").numpy()
    finally:
        acts.close()
    assert list(folder.iterdir()) == []
    assert np.array_equal(got[1:], value.numpy().astype(np.float16).astype(np.float32)) and not got[0].any()
    return got


def _hide_tmpfile(mp: pytest.MonkeyPatch) -> None:
    mp.delattr(os, "O_TMPFILE", raising=False)


def _refuse_tmpfile(mp: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "O_TMPFILE"):
        pytest.skip("this system has no O_TMPFILE to refuse")
    real_open, flag = os.open, os.O_TMPFILE

    def refusing(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & flag == flag:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), str(path))
        return real_open(path, flags, *args, **kwargs)

    mp.setattr(os, "open", refusing)


@pytest.mark.parametrize("how", [_hide_tmpfile, _refuse_tmpfile], ids=["O_TMPFILE missing", "O_TMPFILE refused (EOPNOTSUPP)"])
def test_spilled_activations_without_o_tmpfile(how: Callable[[pytest.MonkeyPatch], None], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "normal").mkdir()
    (tmp_path / "portable").mkdir()
    normal = _spill_round_trip(tmp_path / "normal")
    how(monkeypatch)
    named: list[Any] = []
    _spy(monkeypatch, tempfile, "mkstemp", named)
    assert np.array_equal(_spill_round_trip(tmp_path / "portable"), normal)
    assert len(named) == 1  # the file was made with a name, then unlinked


# --- disk reserved before a file is written through a memory map ---------------------------------


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_reserve_space_allocates_the_blocks(tmp_path: Path) -> None:
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("this system has no posix_fallocate")
    path, size = tmp_path / "f", 8 << 20
    with open(path, "w+b") as f:
        portable.reserve_space(f.fileno(), size, path)
    assert path.stat().st_size == size and _allocated(path) >= size


def _fallocate_says(code: int) -> Callable[[pytest.MonkeyPatch], None]:
    def install(mp: pytest.MonkeyPatch) -> None:
        def fallocate(fd: int, offset: int, length: int) -> None:
            raise OSError(code, os.strerror(code))

        mp.setattr(os, "posix_fallocate", fallocate, raising=False)
    return install


@pytest.mark.parametrize("how", [lambda mp: mp.delattr(os, "posix_fallocate", raising=False),
                                 _fallocate_says(errno.EOPNOTSUPP)],
                         ids=["posix_fallocate missing", "posix_fallocate refused (EOPNOTSUPP)"])
def test_reserve_space_without_fallocate_checks_the_free_space(how: Callable[[pytest.MonkeyPatch], None], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    how(monkeypatch)
    path = tmp_path / "f"
    with open(path, "w+b") as f:
        portable.reserve_space(f.fileno(), 1 << 20, path)  # room: nothing to say
        with pytest.raises(QuantizeError, match="no room on its disk") as err:
            portable.reserve_space(f.fileno(), _free(tmp_path) + (1 << 30), path)
    assert err.value.path == path and "GiB free" in str(err.value)
    assert _allocated(path) < 1 << 20  # the check wrote nothing


def test_a_full_disk_stops_spilled_activations_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from quantize.engine.stream import Activations

    _fallocate_says(errno.ENOSPC)(monkeypatch)
    with pytest.raises(QuantizeError, match=r"quantize-activations-\*\.f16: no room on its disk for"):
        Activations(3, 4, 8, torch.float32, spill=True, spill_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- the hashing thread without SCHED_IDLE --------------------------------------------------------


def _lowered_in_a_thread() -> str:
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(portable.lower_this_thread()))
    t.start()
    t.join()
    return got[0]


def test_the_idle_hash_without_sched_setscheduler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    monkeypatch.setattr(fingerprint, "HASH_CACHE", tmp_path / "sha256.json")
    monkeypatch.delattr(os, "sched_setscheduler", raising=False)
    ways: list[str] = []

    def lower() -> str:
        ways.append(portable.lower_this_thread())
        return ways[-1]

    monkeypatch.setattr(fingerprint, "lower_this_thread", lower)
    assert fingerprint.sha256_when_idle(f).result(timeout=60) == _sha256(f)
    assert ways and ways[0] != "idle"
    assert _lowered_in_a_thread() == ("background" if hasattr(os, "PRIO_DARWIN_THREAD") else "unchanged")


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="no sched_setscheduler to refuse")
def test_a_refused_sched_idle_lowers_the_thread_to_nice_19(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_setscheduler", _refuse(errno.EPERM))
    assert _lowered_in_a_thread() == "nice"
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    monkeypatch.setattr(fingerprint, "HASH_CACHE", tmp_path / "sha256.json")
    assert fingerprint.sha256_when_idle(f).result(timeout=60) == _sha256(f)


def test_a_darwin_thread_goes_to_the_background_band(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without SCHED_IDLE and with Darwin's per-thread priority (Python 3.12+ on macOS): that one."""
    monkeypatch.delattr(os, "sched_setscheduler", raising=False)
    monkeypatch.setattr(os, "PRIO_DARWIN_THREAD", 3, raising=False)
    monkeypatch.setattr(os, "PRIO_DARWIN_BG", 0x1000, raising=False)
    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(os, "setpriority", lambda *a: calls.append(a))
    assert _lowered_in_a_thread() == "background" and calls == [(3, 0, 0x1000)]


# --- /proc, madvise, the Windows refusal ----------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=oct)
def test_umask_without_proc(mask: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = os.umask(mask)
    try:
        set_calls: list[Any] = []
        if (Path("/proc/self/status")).is_file():  # the kernel's own answer first, where it shows one
            with monkeypatch.context() as mp:
                _spy(mp, os, "umask", set_calls)
                assert umask() == mask and not set_calls
        monkeypatch.setattr(portable, "PROC", tmp_path / "no-proc")
        _spy(monkeypatch, os, "umask", set_calls)
        assert umask() == mask and set_calls  # set and restored
        assert os.umask(mask) == mask
        assert plain_mode(is_dir=True) == 0o777 & ~mask
    finally:
        os.umask(old)


def test_release_pages_is_a_no_op_without_madvise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "data"
    f.write_bytes(bytes(range(256)) * 64)
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert portable.release_pages(mm, 0, mmap.PAGESIZE) == (hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"))
        assert bytes(mm[:256]) == bytes(range(256))
        monkeypatch.delattr(mmap, "MADV_DONTNEED", raising=False)
        assert portable.release_pages(mm, 0, mmap.PAGESIZE) is False
        assert bytes(mm[:256]) == bytes(range(256))

    class NoAdvice:  # an mmap without the madvise method
        pass

    assert portable.release_pages(NoAdvice(), 0, mmap.PAGESIZE) is False  # type: ignore[arg-type]


def _fake_sysctl(folder: Path, prints: str) -> Path:
    folder.mkdir()
    exe = folder / "sysctl"
    exe.write_text(f'#!/bin/sh\necho "{prints}"\nprintf "%s\\n" "$@" > "{folder}/args"\n')
    exe.chmod(0o755)
    return folder


def test_gate_kernel_cpu_flags_without_proc_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    with_proc, processor = gk._cpu_flags(), platform.processor()  # (platform caches it: asked before PATH changes)
    monkeypatch.setattr(portable, "PROC", tmp_path / "no-proc")
    bin_dir = _fake_sysctl(tmp_path / "bin", "Apple M2 Pro")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert gk._cpu_flags() == "Apple M2 Pro"
    assert (bin_dir / "args").read_text().split() == ["-n", *gk.SYSCTL_CPU]
    key = gk._key("cc")
    assert key == gk._key("cc") and len(key) == 16 and int(key, 16) >= 0
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))  # no sysctl either
    assert gk._cpu_flags() == processor
    if Path("/proc/cpuinfo").is_file():
        assert with_proc.startswith(("flags", "Features"))


def test_gate_kernel_builds_without_proc_and_without_march_native(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that refuses ``-march=native`` (older Apple clang on arm64), on a system without
    /proc: the kernel is built without that flag and sums as torch does."""
    import shutil

    from quantize.evaluate import row_sums_torch

    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    wrapper = tmp_path / "picky-cc"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && { echo "unsupported: $a" >&2; exit 1; }; done\n'
                       f'exec "{cc}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(portable, "PROC", tmp_path / "no-proc")
    gk.kernel.cache_clear()
    try:
        rng = np.random.default_rng(4)
        x = (rng.standard_normal((5, 3000)) * 3).astype(np.float32)
        w = rng.random((5, 3000)).astype(np.float32)
        got = gk.row_sums(x, w, threads=2)
        assert got is not None, "the kernel did not build without -march=native"
        m, sum2, dot = got
        tm, tsum2, tdot = row_sums_torch(x, w)
        assert np.array_equal(m, tm) and np.allclose(sum2, tsum2, rtol=1e-6) and np.allclose(dot, tdot, rtol=1e-6)
        assert len(list((tmp_path / "cache" / "quantize" / "gate-kernel").glob("*.so"))) == 1
    finally:
        gk.kernel.cache_clear()


def test_locks_exclude_another_holder(tmp_path: Path) -> None:
    """``file_lock`` and ``atomic_dir``'s folder lock take ``flock`` through :func:`quantize.portable.lock_exclusive`."""
    from quantize.atomic import atomic_dir, file_lock

    with file_lock(tmp_path / ".lock", "busy"), open(tmp_path / ".lock") as other, pytest.raises(BlockingIOError):
        portable.lock_exclusive(other, wait=False)
    with open(tmp_path / ".lock") as other:
        portable.lock_exclusive(other, wait=False)  # released with the block
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "out" / "f").read_text() == "x"


@pytest.mark.parametrize("missing", ["fcntl", "pread"])
def test_windows_is_refused_in_one_line(missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert portable.unsupported_platform() is None  # this system runs the package
    if missing == "fcntl":
        monkeypatch.setattr(portable, "fcntl", None)
    else:
        monkeypatch.delattr(os, "pread")
    assert main(["convert", str(tmp_path / "model"), "-o", str(tmp_path / "m.gguf")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err == "quantize: Windows is not supported (no POSIX fcntl/pread); use WSL2 (Linux) or macOS\n"
    assert list(tmp_path.iterdir()) == []
