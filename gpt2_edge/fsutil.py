"""Output safety: write-then-rename, staging directories with an owner, and outputs that never
replace their own source. Torch-free.

Every command that writes a directory (export, quantize, train, demo) stages it beside the
target, then renames it into place. A staging directory records who owns it (pid, process start
time, boot id, host), so a later run can remove the ones left by a killed run, and never the
one a concurrent run is still filling.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import Gpt2EdgeError

OWNER_FILE = ".gpt2-edge-staging.json"  # inside a staging directory; removed before it is published


class OutputError(Gpt2EdgeError):
    """An output path that would destroy or mix with the user's files."""


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


# outputs versus sources --------------------------------------------------------------------------
def check_output(
    out: str | Path,
    sources: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    marker: str | None = None,
    what: str = "output",
) -> Path:
    """Refuse an output directory that would destroy the user's files, before any work is done.

    Refused: an output that is one of ``sources``, contains one, or lies inside one (symlinks
    resolved); an existing file; an existing directory without ``overwrite``; and, even with
    ``overwrite``, a non-empty directory that lacks ``marker`` (so not a ``what`` this command
    wrote earlier). Returns ``out`` as a Path.
    """
    out = Path(out)
    real = out.expanduser().resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        if real == src:
            raise OutputError(
                f"the output {out} is the source {source}: writing it would destroy the source; "
                "choose another output directory"
            )
        if real in src.parents:
            raise OutputError(
                f"the output {out} contains the source {source}: replacing it would destroy the source; "
                "choose another output directory"
            )
        if src in real.parents:
            raise OutputError(
                f"the output {out} lies inside the source {source}; choose another output directory "
                "outside it"
            )
    if real.exists():
        if not real.is_dir():
            raise OutputError(f"the output {out} is a file, not a directory; choose another output directory")
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        if marker and not (real / marker).is_file() and any(real.iterdir()):
            raise OutputError(
                f"{out} exists and is not a {what} (it has no {marker}); --overwrite replaces only an "
                f"earlier {what}: choose another output directory"
            )
    return out


# staging directories -----------------------------------------------------------------------------
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); fields are counted after the command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def owner_record(pid: int | None = None) -> dict[str, Any]:
    """Who owns a staging directory: pid, process start time, boot id and host."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": _start_time(pid), "boot_id": _boot_id(), "host": socket.gethostname()}


def owner_is_dead(record: dict[str, Any]) -> bool:
    """True only when ``record`` provably names a process that has ended."""
    if record.get("host") != socket.gethostname():
        return False  # another machine's run (a shared filesystem): its pids mean nothing here
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    boot = _boot_id()
    if record.get("boot_id") and boot and record["boot_id"] != boot:
        return True  # this machine restarted since: every process of that boot is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    start = record.get("start")
    now = _start_time(pid)
    return start is not None and now is not None and start != now  # the pid now names a later process


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging directories of ``target`` whose owner has provably ended; returns them.

    One without a readable owner file is kept: it may be a concurrent run's, just created.
    """
    removed = []
    for d in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        if d.is_symlink() or not d.is_dir():
            continue
        try:
            record = json.loads((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and owner_is_dead(record):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temp directory beside ``target`` (same filesystem, so ``publish_dir`` is a rename).

    It is removed on any error, KeyboardInterrupt and the CLI's SIGTERM included, so no half-written
    output is left; an owner file inside lets a later run remove it after a SIGKILL, which no
    handler sees. Stale staging directories of ``target`` are removed first.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        (tmp / OWNER_FILE).write_text(json.dumps(owner_record()))
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # a caller that returned without publishing


def publish_dir(src: Path, dst: Path, overwrite: bool) -> Path:
    """Move the finished directory ``src`` to ``dst`` (0755/0644, not mkdtemp's 0700/0600).

    An existing ``dst`` is replaced only with ``overwrite``, and only once ``src`` is complete.
    """
    (src / OWNER_FILE).unlink(missing_ok=True)
    src.chmod(0o755)
    for f in src.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    if dst.exists():
        if not overwrite:
            shutil.rmtree(src, ignore_errors=True)
            raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:  # a signal between the two renames: put the earlier output back
            os.replace(old, dst)
            raise
        if old.is_symlink():  # the output was a link: the directory it named is not ours to delete
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    return dst
