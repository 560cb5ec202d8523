"""Writing files safely.

- Atomic writes: every file is written to a temporary name in its own folder, flushed to disk
  (fsync) and renamed (atomic on POSIX), so nothing half-written is ever left behind; temporary
  files of a killed run (``.tmp-*``) are removed by the next run that owns the folder.
- Owned outputs: a command writes into a new folder, or one it created before (it holds the
  marker file ``.medlsdm-output.json`` naming the command), and refuses a non-empty folder it
  did not create, an existing file, or a path inside or above its inputs, unless told to
  (``overwrite``). Even then it never deletes its inputs. A lock file (``.medlsdm.lock``,
  ``fcntl.flock``: released by the kernel when the process dies, even by SIGKILL) makes a
  second concurrent writer fail at once with a clear message.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from medlsdm.errors import MedlsdmError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_PREFIX = ".tmp-"
MARKER = ".medlsdm-output.json"
LOCK = ".medlsdm.lock"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data (or a folder's entries, after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems (and /dev/shm) refuse fsync on folders
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            if not os.path.islink(os.path.join(root, name)):
                fsync_path(os.path.join(root, name))
        fsync_path(root)


def _reason(exc: OSError) -> str:
    return "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))


def save_array(path: str | os.PathLike, array) -> None:
    """``np.save`` without pickling (plain arrays only); a write error names the file."""
    import numpy as np

    try:
        np.save(path, array, allow_pickle=False)
    except OSError as exc:
        raise MedlsdmError(f"{path}: cannot write ({_reason(exc)})") from exc


def load_array(path: str | os.PathLike, mmap_mode: str | None = "r"):
    """``np.load`` of a plain array (never a pickle); a missing, corrupt or pickled file is a
    one-line error naming it."""
    import numpy as np

    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise MedlsdmError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "allow_pickle" in text or "Python objects" in text:
            text = "holds pickled Python objects, refused (expected a plain array)"
        raise MedlsdmError(f"{path}: cannot read as an array ({text})") from None
    if not isinstance(array, np.ndarray):
        raise MedlsdmError(f"{path}: expected one array (.npy), got {type(array).__name__}")
    return array


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) and check it can be written; a clear error otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedlsdmError(f"{path}: cannot create output folder ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise MedlsdmError(f"{path}: output folder is not writable")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it to `path`, on error remove it.

    The temporary name keeps the full suffix (e.g. ``.nii.gz``) so that libraries choosing a
    format by extension write the right one.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except OSError as exc:  # a full disk, a quota: name the file being written
        tmp_path.unlink(missing_ok=True)
        raise MedlsdmError(f"{path}: cannot write ({_reason(exc)})") from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + path.name + "-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(".old-" + path.name + "-" + tmp.name[-8:])
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON atomically, indented for people to read."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def relative_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` relative to the folder `root` (POSIX form, ``..`` where needed), so that manifests
    and reports name no absolute location."""
    return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedlsdmError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise MedlsdmError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


# ------------------------------------------------------------------------------ owned outputs


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders (``.tmp-*``, ``.old-*``) that a killed run left
    in `folder` (not recursive). Call it only while holding the folder's lock."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith((TEMP_PREFIX, ".old-")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


class OutputLock:
    """An exclusive ``flock`` on a lock file; a second holder fails at once with a one-line error.

    The kernel drops the lock when the process ends (also on SIGKILL), so a killed run never
    leaves a folder locked; the lock file itself is removed on release.
    """

    def __init__(self, lock_path: Path, what: Path):
        import fcntl

        self.path = lock_path
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MedlsdmError(f"{what}: another medlsdm command is writing there now (lock {lock_path}); "
                                   "wait for it to finish or choose another output") from None
            # The previous holder may have removed the file between our open and our lock: then
            # we hold a lock on a file nobody else can find, and must lock the new one.
            try:
                if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _resolved(paths: Iterable) -> list[Path]:
    return [Path(p).resolve() for p in paths if p is not None]


def _input_conflict(path: Path, inputs: list[Path]) -> tuple[str, Path] | None:
    target = path.resolve()
    for source in inputs:
        if target == source:
            return "is", source
        if source in target.parents:
            return "inside", source
        if target in source.parents:
            return "above", source
    return None


def _marker_command(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def _foreign_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in (MARKER, LOCK) and not p.name.startswith(TEMP_PREFIX))


def claim_output(path: str | os.PathLike, command: str, inputs: Iterable = (), overwrite: bool = False,
                 recognise: Callable[[Path], bool] | None = None) -> OutputLock:
    """Check that `command` may write into the folder `path`, create it, mark it as created by
    `command` and lock it; returns the lock (call ``release()``). Prefer `owned_output`.

    Allowed: a missing or empty folder, one holding this command's marker, or one `recognise`
    accepts (outputs of an earlier version, written before markers existed). Refused unless
    `overwrite`: a non-empty folder of something else, an existing file at `path`, or `path`
    inside or above one of `inputs`. Always refused: `path` being one of the `inputs`.
    """
    path = Path(path)
    inputs = _resolved(inputs)
    conflict = _input_conflict(path, inputs)
    if conflict and (conflict[0] == "is" or not overwrite):
        how, source = conflict
        where = {"is": "is", "inside": "is inside", "above": "contains"}[how]
        tail = "" if how == "is" else " (--overwrite allows it; inputs are never deleted)"
        raise MedlsdmError(f"{path}: the output folder {where} the input {source}; choose another output{tail}")
    if path.is_file() or path.is_symlink() and not path.is_dir():
        if not overwrite:
            raise MedlsdmError(f"{path}: exists and is a file, not an output folder (use --overwrite to replace it)")
        path.unlink()
    elif path.is_dir():
        ours = _marker_command(path) == command or (recognise is not None and recognise(path))
        foreign = _foreign_entries(path)
        if foreign and not ours and not overwrite:
            owner = _marker_command(path)
            why = f"written by 'medlsdm {owner}'" if owner else "not created by medlsdm " + command
            raise MedlsdmError(f"{path}: folder is not empty and {why} (holds {', '.join(foreign[:3])}"
                               f"{' ...' if len(foreign) > 3 else ''}); choose a new folder or use --overwrite")
    ensure_writable_dir(path)
    lock = OutputLock(path / LOCK, path)
    try:
        if _marker_command(path) != command:
            write_json(path / MARKER, {"command": command, "created": datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds")})
        remove_stale_temps(path)
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def owned_output(path: str | os.PathLike, command: str, inputs: Iterable = (), overwrite: bool = False,
                 recognise: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """The output folder of `command`, checked, created, marked and locked while the block runs
    (see `claim_output` for what is refused). Write its files with `atomic_output`, or build
    entries in a `staging` folder and `install` them."""
    created = not Path(path).exists()
    lock = claim_output(path, command, inputs, overwrite, recognise)
    try:
        yield Path(path)
    except BaseException:
        _remove_if_unused(Path(path), created)
        raise
    finally:
        lock.release()


def _remove_if_unused(path: Path, created: bool) -> None:
    """A failed command leaves no empty output folder it created (only its marker in it)."""
    if created and path.is_dir() and not _foreign_entries(path):
        remove_stale_temps(path)
        for name in (MARKER, LOCK):
            (path / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()


@contextlib.contextmanager
def owned_target(path: str | os.PathLike, inputs: Iterable = (), overwrite: bool = False) -> Iterator[Path]:
    """One output written as a whole (a file, or a folder that `atomic_directory` replaces):
    refused when it exists (unless `overwrite`) and always when it is, or holds, one of `inputs`;
    its parent is created; a lock beside it (``.NAME.lock``) makes a concurrent writer of the
    same output fail at once. Write it atomically inside the block."""
    path = Path(path)
    conflict = _input_conflict(path, _resolved(inputs))
    if conflict is not None and conflict[0] in ("is", "above"):
        raise MedlsdmError(f"{path}: the output would replace the input {conflict[1]}; choose another output")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise MedlsdmError(f"{path}: exists (use --overwrite to replace it)")
    ensure_writable_dir(path.parent)
    lock = OutputLock(path.with_name(f".{path.name}.lock"), path)
    try:
        yield path
    finally:
        lock.release()


@contextlib.contextmanager
def staging(folder: str | os.PathLike, name: str = "staging") -> Iterator[Path]:
    """A temporary folder inside the owned `folder`, removed afterwards (whatever `install`
    did not move out of it); a killed run's leftovers are removed by the next `claim_output`."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-", dir=folder))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(staged: Path, folder: Path, inputs: Iterable = (), last: Iterable[str] = ()) -> None:
    """Move every entry of the `staged` folder into `folder`, each by an atomic rename, replacing
    entries of the same name and leaving all others alone. Entries named in `last` (e.g. the
    manifest that makes a dataset usable) are removed first and moved in last, so a reader never
    sees them beside half-replaced data. An entry that is or holds one of `inputs` is never
    replaced (an error instead)."""
    staged, folder = Path(staged), Path(folder)
    inputs = _resolved(inputs)
    names = sorted(p.name for p in staged.iterdir())
    last = [n for n in last if n in names]
    for name in names:
        conflict = _input_conflict(folder / name, inputs)
        if conflict is not None and conflict[0] in ("is", "above"):
            raise MedlsdmError(f"{folder / name}: would replace the input {conflict[1]}; choose another output folder")
    _fsync_tree(staged)
    old = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}old-", dir=folder))
    try:
        for name in last:
            if (folder / name).exists() or (folder / name).is_symlink():
                os.replace(folder / name, old / name)
        for name in [n for n in names if n not in last] + last:
            target = folder / name
            if target.is_dir() and not target.is_symlink():
                os.replace(target, old / name)  # a folder cannot be renamed onto a non-empty one
            os.replace(staged / name, target)
        fsync_path(folder)
    finally:
        shutil.rmtree(old, ignore_errors=True)
