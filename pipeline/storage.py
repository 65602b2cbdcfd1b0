"""Where shards and runs live: a local path, or any pyarrow filesystem URI.

``data.shards`` and ``run.storage_path`` may name a local folder (on a cluster: one mounted at
the same path on every node, such as NFS) or a URI that pyarrow opens (``s3://bucket/prefix``,
``gs://bucket/prefix``, ``hdfs://...``, ``file:///abs/path``). Ray Data and Ray Train open
URIs themselves; this module is what the driver uses for its own small files (the manifest,
run markers, reports, search records) and for reading shards without Ray (``iid evaluate``).

A location is kept as a string throughout: ``join`` and ``parent`` work on URIs too, where
``pathlib`` would collapse ``s3://`` into ``s3:/``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import posixpath
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(Exception):
    """A location that cannot be opened, phrased for the user (one line)."""


class LockedError(StorageError):
    """Another process that may still be running holds the lock; ``holder`` says which."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` locations; plain and relative paths are local."""
    return "://" in str(location)


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for local paths and URIs alike."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def absolute(location: str | Path) -> str:
    """URIs as given, local paths made absolute (Ray workers do not share the driver's cwd)."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``location`` and the path inside it.

    Raises:
        StorageError: an unknown scheme, or a filesystem pyarrow cannot open (no credentials).
    """
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise StorageError(f"{location}: cannot open this location ({err})") from err


def is_file(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_text(location: str | Path) -> str:
    """The text of a file.

    Raises:
        FileNotFoundError: when there is no file at ``location``.
    """
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(str(location))
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text_atomic(location: str | Path, text: str) -> None:
    """Write under a temporary name, then rename: readers never see half a file.

    On object stores a single upload is already all-or-nothing; the rename there is a
    server-side copy, still never a partial object.
    """
    fs, path = resolve(location)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, path)


def write_json_atomic(location: str | Path, obj: dict) -> None:
    """``obj`` as indented JSON, written as ``write_text_atomic`` writes."""
    write_text_atomic(location, json.dumps(obj, indent=2))


def list_files(location: str | Path, suffix: str = "") -> list[str]:
    """Files directly under a folder whose names end with ``suffix``, sorted; [] if none."""
    return _children(location, pafs.FileType.File, lambda name: name.endswith(suffix))


def list_dirs(location: str | Path, prefix: str = "") -> list[str]:
    """Folders directly under a folder whose names start with ``prefix``, sorted."""
    return _children(location, pafs.FileType.Directory, lambda name: name.startswith(prefix))


def _children(location: str | Path, kind: pafs.FileType, keep) -> list[str]:
    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        join(location, i.base_name) for i in infos if i.type == kind and keep(i.base_name)
    )


def size(location: str | Path) -> int:
    """A file's size in bytes."""
    fs, path = resolve(location)
    return fs.get_file_info(path).size or 0


def open_input(location: str | Path):
    """A seekable binary file (what ``pyarrow.parquet.ParquetFile`` and ``torch.load`` read)."""
    fs, path = resolve(location)
    return fs.open_input_file(path)


@contextlib.contextmanager
def staged_dir(location: str | Path) -> Iterator[Path]:
    """A local folder whose files end up in ``location``: the folder itself when local,
    otherwise a temporary folder uploaded when the block succeeds."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="iid-"))
    try:
        yield tmp
        fs.create_dir(path, recursive=True)
        pafs.copy_files(
            str(tmp), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- locks
def owner_line() -> str:
    """This process as a lock names it: ``HOST PID TOKEN STARTED``."""
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex[:8]} {started}"


def live_holder(line: str) -> str:
    """Who holds a lock (``pid N`` or ``pid N on host H``, with when it started) when that
    process may still run; "" when it is gone (same host, no such pid) or the line is not a
    lock's. A holder on another host cannot be checked from here and counts as running."""
    parts = line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return ""
    host, pid = parts[0], int(parts[1])
    since = f", since {parts[3]}" if len(parts) > 3 else ""
    if host != socket.gethostname():
        return f"pid {pid} on host {host}{since}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except PermissionError:
        pass  # exists, owned by someone else
    return f"pid {pid}{since}"


@contextlib.contextmanager
def lock(location: str | Path) -> Iterator[str]:
    """Hold the lock file ``location`` while the block runs, and remove it after.

    Locally the file is created atomically (written whole, then hard-linked into place: the
    link fails if the file exists), so of two processes starting at once exactly one wins. On
    object stores there is no atomic create: the check and the write are two requests, so two
    starts within the same second may both proceed.

    Yields:
        The line of a holder that is gone (a killed process) whose lock was taken over, or "".

    Raises:
        LockedError: a process that may still run holds it.
    """
    mine = owner_line()
    taken_over = ""
    if not _create_exclusive(location, mine):
        line = read_text(location).strip() if is_file(location) else ""
        holder = live_holder(line)
        if holder:
            raise LockedError(f"{location}: held by {holder}", holder)
        write_text_atomic(location, mine + "\n")
        if read_text(location).strip() != mine:  # another process took it over just now
            raise LockedError(f"{location}: taken over by another process", "another process")
        taken_over = line or "an unreadable lock"
    try:
        yield taken_over
    finally:
        with contextlib.suppress(OSError, StorageError):
            if read_text(location).strip() == mine:
                fs, path = resolve(location)
                fs.delete_file(path)


def _create_exclusive(location: str | Path, text: str) -> bool:
    """Create the file with ``text`` unless it exists; True when this call created it."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        # Written whole under a temporary name, then hard-linked: the link fails if the file
        # exists, and a reader never sees it empty.
        tmp = Path(f"{path}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True
    if is_file(location):
        return False
    write_text_atomic(location, text + "\n")
    return True
