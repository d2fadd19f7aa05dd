"""Reading an export folder's files as a server must: whoever can write the exports folder (a shared
volume, a mistaken copy) must not be able to hang or exhaust the process that reads it.

Every file is lstat()ed before it is opened and must be a regular file directly inside the folder (a
symlink could point at /dev/zero or /etc/passwd, a FIFO would block the read forever); it is opened
without following links and without blocking, checked again on the open descriptor (it may have been
swapped meanwhile), and read up to its kind's size limit, never more. Failures are FolderError with a
reason that names the file inside the folder, never the server's own paths.
"""
import os
import stat
from pathlib import Path

# The most a server reads of each kind of file (the exporter writes far less: digits' manifest is
# 30 KB, the largest artifact, a width-64 32x32 model, 8 MB).
MAX_BYTES = {
    "manifest": 1 << 20,
    "artifact": 256 << 20,
    "curves": 4 << 20,
    "test_set": 8 << 20,
}


class FolderError(Exception):
    """A file of an export folder that must not be used; the message says why, for people."""


def read_regular(folder: Path, name: str, kind: str) -> bytes:
    """The bytes of `folder/name`, a regular file of at most MAX_BYTES[kind] bytes; FolderError otherwise."""
    limit = MAX_BYTES[kind]
    path = folder / name
    try:
        check(os.lstat(path), name, limit)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FolderError(f"{name} is missing") from None
    except OSError as err:
        raise FolderError(f"cannot read {name}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        try:
            check(os.fstat(f.fileno()), name, limit)  # what was opened, not what was looked at
            data = f.read(limit + 1)
        except OSError as err:
            raise FolderError(f"cannot read {name}: {err.strerror}") from None
    if len(data) > limit:  # grew since it was looked at
        raise FolderError(f"{name} is larger than {limit} bytes, the most read for a {kind}")
    return data


def check(status: os.stat_result, name: str, limit: int) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise FolderError(f"{name} is not a regular file")
    if status.st_size > limit:
        raise FolderError(f"{name} is {status.st_size} bytes; at most {limit} are read")
