"""Atomic file writing: a temporary file in the target's folder, then ``os.replace``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deploykit.errors import UsageError


@contextlib.contextmanager
def atomic_path(target: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success move it over ``target`` atomically.

    On any exception, ``KeyboardInterrupt`` included, the temporary file is removed and an earlier
    ``target`` is left untouched. Raises ``UsageError`` when the folder cannot be written.
    """
    target = Path(target)
    tmp_path = _temp_beside(target, suffix)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _temp_beside(target: Path, suffix: str = "", option: str = "--output") -> Path:
    """Create an empty temporary file in ``target``'s folder; ``UsageError`` when that is impossible.

    ``option`` is the command-line option that named ``target``, for the hint.
    """
    folder = target.parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"Cannot write {str(target)!r}: {str(folder)!r} {problem}.",
                         hint=f"Create the folder first or choose another {option}.")
    if target.is_dir():
        raise UsageError(f"Cannot write {str(target)!r}: it is a folder.",
                         hint="Give a file path such as model.onnx.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(f"Cannot write to {str(folder)!r}: {exc.strerror}.",
                         hint=f"Choose a writable {option} path.") from exc
    os.close(fd)
    return Path(tmp)


def check_writable(target: str | Path, *, option: str = "--output") -> None:
    """Raise ``UsageError`` now, rather than after a long job, when ``target`` could not be written.

    ``option`` names the command-line option that gave ``target`` in the message's hint.
    """
    _temp_beside(Path(target), option=option).unlink()


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
