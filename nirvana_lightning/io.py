"""Atomic writes: write to a temporary sibling, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _read_umask() -> int:
    # os.umask can only be read by setting it: do it once, at import, before any thread of ours exists
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def file_mode() -> int:
    """The mode a newly created file gets under the umask (``mkstemp`` would give 0600)."""
    return 0o666 & ~_UMASK


def dir_mode() -> int:
    """The mode a newly created directory gets under the umask (``mkdtemp`` would give 0700)."""
    return 0o777 & ~_UMASK


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_dir_atomic(target: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` in a temporary sibling directory, then rename it to ``target``.

    An existing non-empty ``target`` is refused (``FileExistsError``) before anything is written,
    unless ``overwrite``; then the old directory is replaced only once the new one is complete,
    and put back if the final rename fails. On any failure nothing half-written remains.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        write(tmp)
        tmp.chmod(dir_mode())  # mkdtemp creates 0700
        if overwrite and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)  # put the previous content back
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    return target


def load_checkpoint(path: str | Path, *, mmap: bool = True) -> dict:
    """Load a Lightning / torch checkpoint file without executing code from it.

    ``torch.load(weights_only=True)``: tensors, containers and primitive values only, so a
    pickle that would run code when unpickled is refused (Lightning's own loader does the same).
    Our checkpoints hold nothing else: the pruning plan is stored as plain data.

    Raises:
        ValueError: naming the file, when it is not a readable checkpoint or holds objects
            other than plain data (we never suggest ``weights_only=False``).
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain data, which would "
            f"run code when loaded ({first}). Only load checkpoints written by nirvana-lightning/Lightning from "
            "sources you trust; this file is not loaded."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"checkpoint {path} is not a readable torch checkpoint (truncated or corrupt): {err}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint
