"""Write-then-rename helpers: no reader ever sees a half-written file or directory. Torch-free."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(src: Path, dst: Path, overwrite: bool) -> Path:
    """Move the finished directory ``src`` to ``dst`` (0755/0644, not mkdtemp's 0700/0600).

    An existing ``dst`` is replaced only with ``overwrite``, and only once ``src`` is complete.
    """
    src.chmod(0o755)
    for f in src.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    if dst.exists():
        if not overwrite:
            shutil.rmtree(src, ignore_errors=True)
            raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    return dst


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temp directory beside ``target`` (same filesystem, so ``publish_dir`` is a rename);
    removed on any error, so no half-written output is left."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
