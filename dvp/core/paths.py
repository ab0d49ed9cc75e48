"""Output paths checked before any compute: a run dir or output file that cannot be written is a ConfigError
naming the key, raised before anything is computed or created.

    check_output_dir(Path("runs/x"), "run_dir")          # may not exist yet; its first existing parent must be a
                                                         # writable directory
    check_output_file(Path("out/r.json"), "out")         # a regular file or none yet, in an existing writable
                                                         # folder
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from dvp.core.errors import ConfigError


def _writable(directory: Path) -> bool:
    """Whether a file can be created in `directory` (tried for real: permission bits do not bind root, and a
    read-only mount shows only on writing)."""
    try:
        probe = tempfile.mkdtemp(dir=directory, prefix=".dvp-write-test-")
    except OSError:
        return False
    shutil.rmtree(probe, ignore_errors=True)
    return True


def check_output_dir(path: Path, key: str) -> None:
    """`path` is a directory, or can be created as one, and is writable."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path} is an existing file, not a directory; give a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {parent} is a file, not a directory")
    if not _writable(parent):
        raise ConfigError(f"{key}={path} is not writable ({parent} refuses new files); choose another {key}")


def check_output_file(path: Path, key: str) -> None:
    """`path` is a file that can be written: a regular file or nothing yet (results are written to a temporary file
    and renamed over it, which would replace a device such as /dev/null), in an existing writable folder."""
    if path.is_dir():
        raise ConfigError(f"{key}={path} is a directory; give a file name")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{key}={path} is not a regular file (a device, pipe or socket, which the result would "
                          "replace); give a file name")
    folder = path.parent
    if not folder.exists():
        raise ConfigError(f"{key}={path}: folder {folder} does not exist; create it or choose another {key}")
    if not folder.is_dir():
        raise ConfigError(f"{key}={path}: {folder} is a file, not a folder")
    if not _writable(folder):
        raise ConfigError(f"{key}={path}: folder {folder} is not writable; choose another {key}")


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary file next to `path`, then move it onto `path` (os.replace), so that
    `path` is never seen half-written; the temporary file is removed if `write` fails or is interrupted."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
