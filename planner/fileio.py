"""Files the CLI reads and writes: text that must be UTF-8, outputs checked before the work
starts, and atomic writes that never leave a half-written file.

    check_output_file("plan.yaml", "-o")      # before planning: SpecError if it cannot be written
    write_atomic("plan.yaml", text)            # after: temp file + rename, mode from the umask
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cost_models.specs import SpecError

MAX_INPUT_BYTES = 64 * 10**6
"""Largest spec/plan/hosts file read (a 16,384-node measured cluster.yaml is ~10 MB)."""


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path`; SpecError naming the file for a missing, unreadable,
    oversized or binary file."""
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise SpecError(f"{what} file {path} is {size / 1e6:.0f} MB, over the "
                            f"{MAX_INPUT_BYTES // 10**6} MB limit; is it the right file?")
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{what} file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise SpecError(f"{what} file {path} is a directory; give the file inside it") from None
    except OSError as exc:
        raise SpecError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if b"\x00" in data:
        raise SpecError(f"{what} file {path} is binary, not text; give a JSON or YAML file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{what} file {path} is not UTF-8 text (bad byte at offset {exc.start}); "
                        "save it as UTF-8") from None


def check_output_file(path: str | Path, option: str) -> Path:
    """Fail now, before any work, if `path` cannot be written as a file: a directory, a
    missing parent directory, or a directory we may not create files in."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{option} {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise SpecError(f"{option} {path}: {parent} is a file, not a directory; choose another path")
    if not parent.is_dir():
        raise SpecError(f"{option} {path}: directory {parent} does not exist; create it first")
    _probe_writable(parent, f"{option} {path}")
    return path


def check_output_dir(path: str | Path, option: str) -> Path:
    """Fail now if `path` cannot be used as an output directory (created if missing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpecError(f"{option} {path} exists and is not a directory; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(f"{option} {path}: cannot create the directory ({exc.strerror})") from None
    _probe_writable(path, f"{option} {path}")
    return path


def _probe_writable(directory: Path, label: str) -> None:
    """Create and remove a temporary file: the only honest test (root ignores mode bits,
    read-only mounts do not)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".meshplan-probe-")
    except OSError as exc:
        raise SpecError(f"{label}: cannot write in {directory} ({exc.strerror}); "
                        "choose a writable location") from None
    os.close(fd)
    os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path | str, text: str | bytes) -> None:
    """Write `text` to `path` via a temporary file and rename: never a half-written file.

    The file gets the mode a plain open() would give (0666 less the umask), not mkstemp's
    0600. An OSError becomes a SpecError naming the path.
    """
    path = Path(path)
    data = text.encode() if isinstance(text, str) else text
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise SpecError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SpecError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
