"""Writing files so that a failure loses nothing: each file goes to a temp file beside it, is fsynced and renamed
over the old one, so a reader sees the old file or the new one, never half of one.

A failed write (disk full, read-only folder, the folder deleted) removes its temp file, leaves the old file as
it was and becomes one DiffuseError line. The libraries we write with report a full disk in their own ways
(torch.save: RuntimeError "… unexpected pos …"; safetensors: SafetensorError), so each is caught here, not
only OSError. Temp files named `.NAME.tmp<pid>` that a killed process (kill -9) left behind are removed by
the next write of NAME from a process that is not their writer.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from diffuse.errors import DiffuseError

TEMP_TAG = ".tmp"


def user_cache(*parts: str) -> Path:
    """$XDG_CACHE_HOME/diffuse/PARTS…, else ~/.cache/diffuse/PARTS…: files we derive once and reuse (never data)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser().joinpath("diffuse", *parts)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_TAG}{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the `.NAME.tmp<pid>` files beside `path` whose writing process is gone (killed mid-write)."""
    removed = []
    prefix = f".{path.name}{TEMP_TAG}"
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        pid = entry.name[len(prefix):]
        if entry.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _reason(e: BaseException, folder: Path) -> str:
    """A write error in words: the OS's (No space left on device) where the library hid it in its message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < 1 << 20:  # under 1 MiB left: the disk is full
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    try:
        import resource
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return os.strerror(errno.EFBIG) + " (this process's file-size limit, ulimit -f)"
    except (ImportError, ValueError, OSError):
        pass
    return " ".join(str(e).split())[:200] or type(e).__name__


def write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write can raise: OSError, torch.save's RuntimeError, safetensors' SafetensorError."""
    errors: tuple[type[BaseException], ...] = (OSError, RuntimeError)
    try:
        from safetensors import SafetensorError
        errors += (SafetensorError,)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return errors


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], what: str = "") -> Path:
    """write(temp) then fsync and rename it to `path`. On failure: the temp file removed, `path` unchanged, one
    DiffuseError line ("cannot write WHAT PATH: reason; PATH is unchanged")."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except write_errors() as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        kept = f"; {path.name} is unchanged" if path.is_file() else ""
        raise DiffuseError(f"cannot write {what + ' ' if what else ''}{path}: {_reason(e, path.parent)}{kept}") from None
    return path
