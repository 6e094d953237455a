"""Streaming safetensors writer: header first, then one tensor at a time.

The header is known up front from the plan (names, dtypes, shapes), so each tensor is written
as soon as it is produced and then dropped. Output goes to a temp file in the target directory
and is renamed into place only after every tensor was written and flushed; on any error or
Ctrl-C the temp file is removed. A background thread does the writing so that reading and
converting the next tensor overlaps with writing the previous one.
"""
from __future__ import annotations

import errno
import json
import math
import os
import queue
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import dtypes
from .errors import DiskSpaceError, OutputError, OutputExistsError, UsageError, raise_all

ALIGN = 8
SPACE_MARGIN = 16 * 1024 * 1024


@dataclass(frozen=True)
class OutSpec:
    """One tensor the writer will receive: name, safetensors dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


def build_header(specs: Sequence[OutSpec], metadata: dict[str, str] | None) -> bytes:
    """The safetensors header bytes (length prefix + JSON padded with spaces to 8 bytes)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    seen = set()
    for s in specs:
        if s.name in seen:
            raise UsageError(f"duplicate output tensor name '{s.name}'")
        seen.add(s.name)
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_output(out: Path, inputs: Iterable[Path], overwrite: bool, need_bytes: int,
                 is_dir: bool = False) -> list:
    """Everything that would stop us writing ``out``, found before any work is done."""
    problems = []
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        problems.append(OutputError("output directory does not exist", path=parent,
                                    hint="create it first or choose another output path"))
        return problems
    if not _writable(parent):
        problems.append(OutputError("output directory is not writable", path=parent,
                                    hint="choose a writable location"))
        return problems
    out_res = out.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if p == out_res or (is_dir and out_res in p.parents) or (out.exists() and _same(p, out)):
            problems.append(UsageError("output would overwrite an input", path=out,
                                       hint="choose a different output path"))
            return problems
        if p.is_dir() and p in out_res.parents:
            # a folder input is read as a whole (a diffusers model): a new file inside it
            # would change what the input is
            problems.append(UsageError(f"output is inside the input folder {p}", path=out,
                                       hint="write outside the input folder"))
            return problems
    if out.exists() and not overwrite:
        problems.append(OutputExistsError("output already exists", path=out,
                                          hint="pass --overwrite to replace it"))
    if out.exists() and is_dir != out.is_dir():
        problems.append(OutputExistsError("output exists and is a " +
                                          ("folder" if out.is_dir() else "file"), path=out))
    if not problems and need_bytes:
        free = disk_free(parent)
        if free < need_bytes + SPACE_MARGIN:
            problems.append(DiskSpaceError(
                f"not enough disk space: need {_gb(need_bytes)}, {_gb(free)} free", path=parent,
                hint="free some space or write elsewhere"))
    return problems


def _writable(folder: Path) -> bool:
    """Really try to create a file (os.access says yes to root on read-only mounts)."""
    probe = folder / f".convkit-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "xb"):
            pass
        probe.unlink()
        return True
    except OSError:
        return False


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def temp_path_for(out: Path) -> Path:
    return out.parent / f".{out.name}.convkit-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


_TEMP = re.compile(r"^\..+\.convkit-(\d+)-[0-9a-f]{8}\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's process: alive
        return True
    return True


def cleanup_stale(folder: Path) -> list[Path]:
    """Remove temp files/folders that convkit runs killed hard (``kill -9``, power loss) left in
    ``folder``: only names of convkit's temp pattern whose process is gone. Returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP.match(e.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        p = Path(e.path)
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def create_temp(path: Path) -> int:
    """Create ``path`` exclusively (O_EXCL) with the mode a plain ``open()`` gives under the
    user's umask (0666 & ~umask); returns the fd."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)


def _os_error(e: OSError, path: Path) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskSpaceError("disk full while writing; nothing was kept", path=path,
                              hint="free some space or write elsewhere")
    return OutputError(f"cannot write ({e.strerror or e})", path=path)


class WriterThread:
    """Writes queued byte buffers to a file in order, from one background thread.

    ``write(buf)`` is the file write (called on the thread; OSError becomes the convkit error
    for ``path``). A failure is kept and raised in the producer on its next ``put``/``check``;
    ``release()`` callbacks run once a buffer is written (or dropped after a failure), so
    producers can recycle buffers. ``stop()`` drains the queue and joins; it is safe to call
    when the thread never started.
    """

    def __init__(self, write, path: Path, depth: int = 2, name: str = "convkit-writer"):
        self._write, self._path = write, path
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._err: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(target=self._drain, name=name,
                                                                 daemon=True)

    def start(self) -> "WriterThread":
        self._thread.start()
        return self

    def put(self, data, release=None) -> None:
        self.check()
        while True:
            try:
                self._q.put((data, release), timeout=0.2)
                return
            except queue.Full:
                self.check()

    def check(self) -> None:
        if self._err is not None:
            err, self._err = self._err, None
            raise err

    def stop(self) -> None:
        t, self._thread = self._thread, None
        if t is None or t.ident is None:  # never started (e.g. Ctrl-C inside start())
            return
        self._q.put(_STOP)
        t.join()

    def _drain(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            data, release = item
            if self._err is None:
                try:
                    self._write(data)
                except OSError as e:
                    self._err = _os_error(e, self._path)
                except BaseException as e:  # reported to the producer on its next call
                    self._err = e
            if release is not None:
                release()


class SafetensorsWriter:
    """Write one safetensors file from a known list of tensors, streaming and atomically.

    Use as a context manager: leaving the block normally commits (rename into place), leaving it
    by an exception (Ctrl-C included) removes the temp file. ``final_path`` may be inside a
    staging folder that a :class:`FolderStage` renames as a whole.
    """

    def __init__(self, path: str | os.PathLike, specs: Sequence[OutSpec],
                 metadata: dict[str, str] | None = None, *, threaded: bool = True,
                 queue_depth: int = 2):
        self.path = Path(path)
        self.specs = list(specs)
        self._index = {s.name: i for i, s in enumerate(self.specs)}
        self._next = 0
        self._header = build_header(self.specs, metadata)
        self.tmp = temp_path_for(self.path)
        self._f = None
        self._threaded = threaded
        self._queue_depth = queue_depth
        self._thread: WriterThread | None = None
        self._part = 0  # bytes of the current tensor received through write_part
        self.bytes_written = 0
        self._at: dict[str, int] | None = None   # positional mode: bytes written per tensor
        self._at_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> "SafetensorsWriter":
        try:
            cleanup_stale(self.tmp.parent)
            self._f = open(self.tmp, "xb")
            self._f.write(self._header)
            if self._threaded:
                self._thread = WriterThread(self._write_bytes, self.path, self._queue_depth)
                self._thread.start()
        except OSError as e:
            self.abort()
            raise _os_error(e, self.path) from None
        except BaseException:  # Ctrl-C between creating the file and returning
            self.abort()
            raise
        return self

    def __enter__(self) -> "SafetensorsWriter":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Hand over the next tensor (in spec order); it is written and then released."""
        spec = self._expect(name)
        if dtypes.from_torch(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise UsageError(f"got {dtypes.from_torch(tensor.dtype)}{list(tensor.shape)}, planned "
                             f"{spec.dtype}{list(spec.shape)}", path=self.path, key=name)
        if self._part:
            raise UsageError(f"tensor '{spec.name}' was only partly written", path=self.path)
        self._next += 1
        data = tensor.detach().contiguous().view(-1).view(torch.uint8) if tensor.numel() else None
        self._enqueue(data, None)

    def write_part(self, name: str, data: torch.Tensor, release=None) -> None:
        """Hand over the next bytes (1-D uint8) of tensor ``name``; parts arrive in order.

        ``release()`` is called (from the writer thread) once the bytes are on their way to
        disk, so the caller can reuse the buffer.
        """
        spec = self._expect(name)
        self._part += data.numel()
        if self._part > spec.nbytes:
            raise UsageError(f"{self._part} bytes written, planned {spec.nbytes}", path=self.path,
                             key=name)
        if self._part == spec.nbytes:
            self._next += 1
            self._part = 0
        self._enqueue(data, release)

    def _expect(self, name: str) -> OutSpec:
        """The spec of the next sequential tensor, which must be ``name``."""
        self._not_positional()
        if self._next >= len(self.specs):
            raise UsageError(f"unexpected extra tensor '{name}'", path=self.path)
        spec = self.specs[self._next]
        if name != spec.name:
            raise UsageError(f"tensor '{name}' written out of order (expected '{spec.name}')",
                             path=self.path)
        return spec

    # -- positional mode: any thread, any order ----------------------------------------------
    def begin_positional(self) -> None:
        """Switch to positional writes (:meth:`write_at`): the file gets its final size now and
        several threads may then write any tensor's bytes at their place, in any order. Every
        tensor must be written exactly once, in full, before :meth:`commit`."""
        self._not_positional()
        if self._next or self._part:
            raise UsageError("positional writes must start before any tensor is written",
                             path=self.path)
        self._stop_thread()
        self._raise_if_failed()
        self._thread = None
        base = len(self._header)
        self._data_at = {}
        for spec in self.specs:
            self._data_at[spec.name] = base
            base += spec.nbytes
        self._at = {spec.name: 0 for spec in self.specs}
        try:
            self._f.flush()
            os.ftruncate(self._f.fileno(), base)
        except OSError as e:
            raise _os_error(e, self.path) from None

    def write_at(self, name: str, start: int, data: torch.Tensor) -> None:
        """Write ``data`` (1-D uint8) as bytes ``start:start+len`` of tensor ``name``."""
        if self._at is None:
            raise UsageError("write_at needs begin_positional()", path=self.path)
        n = data.numel()
        spec = self.specs[self._index[name]]
        if start < 0 or start + n > spec.nbytes:
            raise UsageError(f"bytes {start}:{start + n} outside the planned {spec.nbytes}",
                             path=self.path, key=name)
        mv = memoryview(data.numpy()) if n else b""
        pos, done = self._data_at[name] + start, 0
        try:
            while done < n:
                done += os.pwrite(self._f.fileno(), mv[done:], pos + done)
        except OSError as e:
            raise _os_error(e, self.path) from None
        with self._at_lock:
            self._at[name] += n
            self.bytes_written += n

    def _not_positional(self) -> None:
        if self._at is not None:
            raise UsageError("sequential write after begin_positional()", path=self.path)

    def _positional_missing(self) -> str | None:
        for spec in self.specs:
            if self._at[spec.name] != spec.nbytes:
                return (f"tensor '{spec.name}': {self._at[spec.name]} of {spec.nbytes} bytes "
                        "were written")
        return None

    def _enqueue(self, data, release) -> None:
        if self._thread is None:
            self._write_checked(data)
            if release is not None:
                release()
            return
        self._thread.put(data, release)

    def check_alive(self) -> None:
        """Raise the writer thread's error, if it had one (for callers waiting on buffers)."""
        self._raise_if_failed()

    def commit(self) -> Path:
        try:
            self._stop_thread()
            self._raise_if_failed()
            problem = self._positional_missing() if self._at is not None else None
            if problem:
                raise UsageError(problem, path=self.path)
            if self._at is None and (self._next != len(self.specs) or self._part):
                missing = self.specs[self._next].name
                raise UsageError(f"only {self._next} of {len(self.specs)} tensors were written "
                                 f"(next: '{missing}')", path=self.path)
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                self._f = None
                os.replace(self.tmp, self.path)
            except OSError as e:
                raise _os_error(e, self.path) from None
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Stop writing and remove the temp file; never raises over the error being handled."""
        try:
            self._stop_thread()
        except Exception:
            pass
        finally:
            self._cleanup()

    # -- internals ---------------------------------------------------------------------------
    def _write_bytes(self, data) -> None:
        if data is None:
            return
        mv = memoryview(data.numpy())
        self._f.write(mv)
        self.bytes_written += len(mv)

    def _write_checked(self, data) -> None:
        try:
            self._write_bytes(data)
        except OSError as e:
            raise _os_error(e, self.path) from None

    def _raise_if_failed(self) -> None:
        if self._thread is not None:
            self._thread.check()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._thread.stop()

    def _cleanup(self) -> None:
        discard(self._f, self.tmp)
        self._f = None


def discard_fd(fd: int | None, tmp: Path) -> None:
    """Close ``fd`` (if open) and remove the temp file ``tmp``; never raises."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        tmp.unlink()
    except OSError:
        pass


def discard(f, tmp: Path) -> None:
    """Close ``f`` (if open) and remove the temp file ``tmp``; never raises."""
    if f is not None:
        try:
            f.close()
        except OSError:
            pass
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass


_STOP = object()


class FolderStage:
    """Build an output folder under a temp name beside it and rename it into place at the end."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out)
        self.tmp = temp_path_for(self.out)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        try:
            cleanup_stale(self.tmp.parent)
            self.tmp.mkdir()
        except OSError as e:
            raise _os_error(e, self.out) from None
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            if self.out.exists():
                old = temp_path_for(self.out)
                os.replace(self.out, old)
                os.replace(self.tmp, self.out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.out)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise _os_error(e, self.out) from None


def validate_or_raise(out: Path, inputs: Iterable[Path], overwrite: bool, need_bytes: int,
                      is_dir: bool = False) -> None:
    raise_all(check_output(out, inputs, overwrite, need_bytes, is_dir))
