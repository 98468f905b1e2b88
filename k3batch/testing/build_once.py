"""Cached artifacts that appear whole: `build_dir` builds a directory once, however many
processes ask for it at the same time.

Two Serve replicas (or two generation actors on one node) of a `make_tiny` config both build
`.cache/k3batch/<set>` when it is missing. Built in place, or built apart but then put in
place over the other's finished copy, one process reads files the other is still writing or
has just removed. Here every builder takes a file lock beside the target (`<path>.lock`,
`filelock`), checks again whether it is there, and only then writes into a temporary sibling
that is renamed onto `path` when complete: exactly one process builds, the others wait on
the lock and find the artifact whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable


def lock_path(path: str) -> str:
    """The lock file guarding `path`'s build: beside it, so every process on the machine
    (and every node on a shared filesystem) that builds `path` takes the same one."""
    return os.path.abspath(path).rstrip(os.sep) + ".lock"


def build_dir(
    path: str,
    write: Callable[[str], None],
    is_built: Callable[[str], bool],
    overwrite: bool = False,
) -> str:
    """Make the directory `path` with `write(tmp)` unless `is_built(path)`; returns `path`.

    `write` fills a fresh temporary directory beside `path`, which is renamed onto `path`
    once `write` returns. `is_built` must be true only for a complete artifact (a marker
    written last). `overwrite` rebuilds even a complete one: it is swapped in by two renames,
    the old copy removed afterwards.
    """
    from filelock import FileLock

    if not overwrite and is_built(path):
        return path  # the usual case: built earlier, no lock needed
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with FileLock(lock_path(path)):
        if not overwrite and is_built(path):
            return path  # another process built it while this one waited
        name = os.path.basename(os.path.abspath(path))
        tmp = tempfile.mkdtemp(prefix=f".{name}.building-", dir=parent)
        old = None
        try:
            write(tmp)
            if os.path.lexists(path):  # an incomplete leftover, or overwrite
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.rename(path, os.path.join(old, name))
            os.rename(tmp, path)
        finally:
            for leftover in (tmp, old):
                if leftover and os.path.exists(leftover):
                    shutil.rmtree(leftover, ignore_errors=True)
    return path


def build_file(path: str, write: Callable[[str], None], overwrite: bool = False) -> str:
    """Make the file `path` with `write(tmp_file)` unless it exists; returns `path`. As
    `build_dir`: one builder under the lock, the file renamed into place whole."""
    from filelock import FileLock

    if not overwrite and os.path.exists(path):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with FileLock(lock_path(path)):
        if not overwrite and os.path.exists(path):
            return path
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.building-", dir=parent)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path
