"""Atomic file writes: write to a temp file in the same folder, fsync, then rename.

A crash, Ctrl-C or power cut mid-write leaves either the old file or none, never a truncated one.
Temp names are `.<target name>.<random>.tmp` (see `TEMP_NAME`); a killed process can leave them behind,
and `leftover_temp_paths()` finds them so the next run can clean up.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# mkstemp/mkdtemp names: "." + target name + "." + 8 random [a-z0-9_] + ".tmp"
TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
# a folder being replaced is first moved here; it is removed once the new folder is in place
BACKUP_SUFFIX = ".old"


def _current_umask() -> int:
    # The only portable way to read the umask is to set it; restore it at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_like_new(path: Path, base_mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the result the mode a plain open()/mkdir() would."""
    os.chmod(path, base_mode & ~_current_umask())


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entry to disk (folders: so a rename survives a power cut)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it is flushed and renamed over `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _chmod_like_new(tmp_path, 0o666)
        fsync_path(tmp_path)
        os.replace(tmp_path, target)
        fsync_path(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, but atomic. Tensors are made contiguous first."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def backup_path(target: str | os.PathLike) -> Path:
    """Where `atomic_directory` parks the previous folder while the new one moves in."""
    target = Path(target)
    return target.with_name(f".{target.name}{BACKUP_SUFFIX}")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` as a whole.

    Replacing takes two renames (old -> backup, new -> target). A kill between them leaves the old folder
    under `backup_path(target)`, complete: `restore_interrupted_replacement()` moves it back, and
    `--resume auto` finds it meanwhile. Everything is fsynced before the renames.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _chmod_like_new(tmp, 0o777)
        _fsync_tree(tmp)
        if target.exists():
            backup = backup_path(target)
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
            os.replace(tmp, target)
            fsync_path(target.parent)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def restore_interrupted_replacement(target: str | os.PathLike) -> bool:
    """After a kill between the two renames of `atomic_directory`: put the parked folder back. True if done."""
    target, backup = Path(target), backup_path(target)
    if backup.is_dir() and not target.exists():
        os.replace(backup, target)
        fsync_path(target.parent)
        return True
    return False


def leftover_temp_paths(folder: str | os.PathLike, is_ours: Callable[[str], bool]) -> list[Path]:
    """Temp files/folders of interrupted atomic writes in `folder` whose target name passes `is_ours`, plus
    parked backups whose replacement completed (the target exists again)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = TEMP_NAME.fullmatch(entry.name)
        if match and is_ours(match.group("target")):
            found.append(entry)
        elif entry.name.endswith(BACKUP_SUFFIX) and entry.is_dir():
            target = entry.name[1:-len(BACKUP_SUFFIX)]
            if entry.name.startswith(".") and is_ours(target) and (folder / target).exists():
                found.append(entry)
    return sorted(found)


def path_size(path: Path) -> int:
    """Bytes held by a file or a folder tree."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0
