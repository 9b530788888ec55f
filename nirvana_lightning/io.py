"""Atomic writes: write to a temporary sibling, then rename."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
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


class PathLocked(OSError):
    """Another live process holds the lock of this path."""


class PathLock:
    """An advisory lock next to ``path`` (``.<name>.lock``, ``flock``): held by a live process only.

    The kernel drops the lock when its process dies (SIGKILL and power loss included), so a stale lock
    file never blocks anyone; the file records the holder's pid and is removed when the lock is released.

    Args:
        path: the file or directory the lock guards (it need not exist yet).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock_file = self.path.parent / f".{self.path.name}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: bool = True) -> PathLock:
        """Take the lock; ``wait=False`` raises :class:`PathLocked` (naming the holder's pid) when it is taken."""
        import fcntl

        if self._fd is not None:
            return self
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise PathLocked(errno.EBUSY, f"{self.path} is claimed by another running process (pid {holder}, "
                                              f"lock {self.lock_file})") from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder we waited for removes the file on release: lock the file that is there now
                same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (a killed holder leaves the file; the next holder takes it)."""
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_file)  # while still held: a waiter then sees another inode and retries
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> PathLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __getstate__(self) -> dict:  # a pickled copy (a checkpointed callback) holds no lock
        return {"path": self.path, "lock_file": self.lock_file, "_fd": None}


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto it when the block succeeds (removed when it fails):
    readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, path.name)  # a writer killed mid-write left its temporary file
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so readers see either the old file or the complete new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


MANIFEST = "nirvana_files.json"
_LEFTOVER = re.compile(r"^\.(?P<name>.+?)\.(?P<kind>tmp|old)-(?P<pid>\d+)-")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, _dev: int, _ino: int, _size: int, _mtime_ns: int) -> str:
    return sha256_file(path)


def sha256_written(path: str | Path) -> str:
    """sha256 of a file this process just wrote, hashed once even when the model card and the manifest both ask.

    Keyed on the file's identity, size and modification time; checks of files on disk (``verify_manifest``)
    always read the bytes again.
    """
    st = os.stat(path)
    return _sha256_of(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(dirpath, name)):  # a link's target is not ours to sync
                _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(parent: Path, name: str) -> list[Path]:
    """Clean up after writers of ``parent/name`` that died (their pid is gone).

    A ``.<name>.old-<pid>-*`` directory while ``name`` itself is missing is the previous export of a
    writer killed between its two renames (systems without an atomic exchange): it is renamed back to
    ``name``, never deleted. Every other ``.<name>.tmp-*`` / ``.<name>.old-*`` of a dead writer is removed.
    """
    removed = []
    if not parent.is_dir():
        return removed
    dead = []
    for entry in parent.iterdir():
        m = _LEFTOVER.match(entry.name)
        if m and m["name"] == name and not _pid_alive(int(m["pid"])):
            dead.append((m["kind"], entry))
    target = parent / name
    orphans = sorted((e for k, e in dead if k == "old" and e.is_dir()), key=lambda e: e.stat().st_mtime)
    if orphans and not os.path.lexists(target):
        os.rename(orphans[-1], target)  # the newest previous export comes back
        dead = [(k, e) for k, e in dead if e != orphans[-1]]
    for _, entry in dead:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's ``renameat2(RENAME_EXCHANGE)``; False where the OS lacks it."""
    if sys.platform != "linux":
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem without the flag
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _owned(directory: Path) -> set[str] | None:
    """Relative paths of the files a previous write of ours listed in its manifest (None: no manifest)."""
    try:
        data = json.loads((directory / MANIFEST).read_text())
        return set(data["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _files(root: Path) -> list[str]:
    """Relative paths of every file (and symlink) below ``root``."""
    out = []
    for dirpath, _, files in os.walk(root):
        out += [Path(dirpath, f).relative_to(root).as_posix() for f in files]
    return sorted(out)


def _carry(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` without copying bytes where possible (a hard link), else a copy (links stay links)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem below, protected hard links, no hard links at all
        shutil.copy2(src, dst)


def _apply_umask_modes(root: Path) -> None:
    """Give every file and directory under ``root`` the mode the umask gives a new one (executables keep x)."""
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(dir_mode())
        else:
            executable = path.stat().st_mode & 0o111
            path.chmod(file_mode() | (executable & ~_UMASK))


def _write_manifest(tmp: Path) -> None:
    files = [f for f in _files(tmp) if f != MANIFEST and not (tmp / f).is_symlink()]
    entries = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_written(tmp / f)} for f in files}
    (tmp / MANIFEST).write_text(json.dumps({"files": entries}, indent=1, sort_keys=True) + "\n")


def verify_manifest(directory: str | Path, names: list[str] | None = None, *,
                    top_level: bool = False) -> dict[str, dict]:
    """Check the sha256 of the listed files (all, ``names``, or with ``top_level`` those not in a subfolder).

    Returns:
        the manifest's ``{relative path: {"bytes", "sha256"}}``.

    Raises:
        ValueError: naming the file whose bytes changed, or a listed file that is missing.
    """
    directory = Path(directory)
    try:
        data = json.loads((directory / MANIFEST).read_text())["files"]
        if not isinstance(data, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{directory / MANIFEST} is corrupt ({type(err).__name__}: {err})") from None
    if names is None:
        names = sorted(n for n in data if not (top_level and "/" in n))
    for name in names:
        if name not in data:
            continue
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{path} is listed in {MANIFEST} but missing")
        if sha256_file(path) != data[name]["sha256"]:
            raise ValueError(f"{path} does not match its sha256 in {MANIFEST}: the file was modified or corrupted "
                             "(pass verify=False to load it anyway)")
    return data


def write_dir_atomic(target: str | Path, write: Callable[[Path], None], *, overwrite: bool = False,
                     manifest: bool = False) -> Path:
    """Run ``write(tmp_dir)`` in a temporary sibling directory, then swap it in as ``target``.

    - An existing non-empty ``target`` is refused (``FileExistsError``) before anything is written,
      unless ``overwrite``; a ``target`` that is a file is refused too.
    - The new content is fsynced, then exchanged with the old directory in one atomic step
      (``renameat2(RENAME_EXCHANGE)`` on Linux), so readers and a crash at any point see either the
      old directory or the complete new one. Where the OS lacks the exchange, the old directory is
      renamed aside and the new one renamed in: a crash between the two renames leaves the old content
      under ``.<name>.old-<pid>-*`` and no ``target``, the only window.
    - ``manifest``: write ``nirvana_files.json`` (size and sha256 of every file). On overwrite, files of
      the old directory that its manifest does not list (or, without one, that the new write does not
      produce) are carried over (hard links, or copies across filesystems): files we did not write are
      never deleted.
    - ``target`` a mount point (a Docker volume): it cannot be renamed, so the files are moved in one by
      one (each atomically), then our stale files removed; a crash in between leaves a mix of files.
    - Temporary siblings left by writers that died are removed first; on any failure nothing
      half-written remains.
    """
    target = Path(target)
    if target.is_symlink():  # write where the link points; the link stays
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is a file, not a directory")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    in_place = target.exists() and os.path.ismount(target)
    work = target if in_place else target.parent  # the same filesystem as the final names
    remove_leftovers(work, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=work))
    old: Path | None = None
    try:
        write(tmp)
        if manifest:
            _write_manifest(tmp)
        tmp.chmod(dir_mode())  # mkdtemp creates 0700
        _apply_umask_modes(tmp)  # writers that use mkstemp (safetensors' shards) leave 0600 files
        if target.exists() and not in_place:
            owned = _owned(target)
            ours = owned if owned is not None else set(_files(tmp))
            for rel in _files(target):  # files we did not write (by path) are carried into the new copy
                if rel not in ours and not os.path.lexists(tmp / rel):
                    _carry(target / rel, tmp / rel)
        _fsync_tree(tmp)
        if in_place:
            _move_into_mount(tmp, target)
        elif target.exists():
            if _exchange(tmp, target):
                old = tmp  # now holds the previous content
            else:
                old = target.with_name(f".{target.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}")
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)  # put the previous content back
                    old = None
                    raise
        else:
            os.rename(tmp, target)
        _fsync_path(target.parent)
    except BaseException as err:
        if old is not tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(err) and not isinstance(err, OSError):  # e.g. safetensors' own error type
            raise OSError(errno.ENOSPC, f"no space left on the device of {target} while writing it; nothing was "
                                        f"written ({type(err).__name__}: {err})") from err
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _is_disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


def _move_into_mount(tmp: Path, target: Path) -> None:
    """File by file into a directory that cannot be renamed; only files of ours are replaced or removed."""
    owned = _owned(target) or set()
    new = _files(tmp)
    for rel in sorted(new, key=lambda r: r == MANIFEST):  # the manifest last: until then the old one names ours
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            raise IsADirectoryError(f"{dest} is a directory; cannot write the file {rel} there")
        os.replace(tmp / rel, dest)
        if not dest.is_symlink():
            _fsync_path(dest)
    for rel in sorted(owned - set(new) - {MANIFEST}):
        (target / rel).unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    _fsync_path(target)


def checkpoint_file(path: str | Path) -> Path:
    """The file holding a checkpoint's non-tensor state: the path itself, or ``meta.pt`` inside a sharded
    (distributed) checkpoint directory written by Lightning's ``ModelParallelStrategy`` / FSDP."""
    path = Path(path)
    return path / "meta.pt" if path.is_dir() and (path / "meta.pt").is_file() else path


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
