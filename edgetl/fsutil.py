"""Atomic file and directory writes, checksums and path confinement (TF-free)."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path (same folder, same suffix) for a writer that needs a filename; rename on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.is_dir():
            if path.exists():
                shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


# --- folders edgetl writes as a whole (runs, bundles, verify reports) ---------------------------------------------
#
# One scheme for every output folder: it is built in a fresh hidden temp folder beside the target
# (``.NAME.<random>.partial``, holding a pid file while it is being written: :func:`atomic_dir`), or, for a writer
# that resumes (finetune), in the fixed ``.NAME.partial`` (:func:`resume_dir`), and swapped in by :func:`commit_dir`:
# the target checked again, then two renames (:func:`swap_dir`: the old folder goes to ``.NAME.old<pid>`` first,
# then is deleted). An existing folder is only
# ever replaced when :func:`check_target` can prove it is edgetl's own: its marker file (``manifest.json``,
# ``bundle.json``, ``report.json``) carries edgetl's schema and every entry in it is one edgetl wrote (listed in the
# marker's ``files``, a known name, or one of edgetl's own partial-file names). Replacing an earlier run or bundle
# also needs ``force`` (the CLI's ``--force``). :func:`clean_stale` removes what killed runs left beside the target.

PID_FILE = ".edgetl.pid"
#: Names of the temporary files and folders edgetl itself creates (atomic writes, temp folders, swapped-out folders).
PARTIAL_PATTERNS = (".*.partial", ".*.partial[0-9]*", ".*.partial[0-9]*.*", ".*.partial.*", ".*.old[0-9]*")


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder edgetl writes as a whole: how to recognise one, and which entries in it are edgetl's."""

    what: str  # "run directory", "bundle", "verify report folder"
    marker: str | None  # the file that proves the folder is edgetl's (None: recognised by its entries alone)
    schema_prefix: str = ""  # the marker's "schema" must start with this
    names: tuple[str, ...] = ()  # fnmatch patterns of further files edgetl writes here
    children: tuple[tuple[str, "FolderKind"], ...] = ()  # sub-folders that are themselves edgetl folders
    nested: tuple["FolderKind", ...] = ()  # kinds of edgetl folder also accepted as any top-level sub-folder


def _read_marker(path: Path, kind: FolderKind) -> dict | None:
    if kind.marker is None:
        return {}
    marker = path / kind.marker
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith(kind.schema_prefix):
        return None
    return data


def _is_partial(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in PARTIAL_PATTERNS)


def foreign_entries(path: str | Path, kind: FolderKind) -> list[str] | None:
    """Entries of ``path`` (relative paths) that edgetl did not write; None if ``path`` is not a ``kind`` at all.

    Symbolic links are always foreign: edgetl never creates one.
    """
    path = Path(path)
    marker = _read_marker(path, kind)
    if marker is None:
        return None
    listed = marker.get("files")
    owned = {str(k) for k in listed} if isinstance(listed, dict) else set()
    if kind.marker:
        owned.add(kind.marker)
    owned_dirs = {p.as_posix() for rel in owned for p in Path(rel).parents if p.as_posix() != "."}
    children = dict(kind.children)
    foreign: list[str] = []

    def walk(folder: Path, rel: str) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name = f"{rel}{entry.name}"
            if entry.is_symlink():
                foreign.append(name)
            elif entry.is_dir():
                if not rel and entry.name in children:
                    sub = foreign_entries(entry.path, children[entry.name])
                    if sub is None:
                        foreign.append(name + "/")
                    else:
                        foreign.extend(f"{name}/{s}" for s in sub)
                elif name in owned_dirs:
                    walk(Path(entry.path), name + "/")
                elif not rel and any(foreign_entries(entry.path, k) == [] for k in kind.nested):
                    pass  # e.g. a bundle exported into RUN/other-bundle/: edgetl's own, whole
                elif not (entry.name.startswith(".") and _is_partial(entry.name)):
                    foreign.append(name + "/")
            elif not (
                name in owned
                or _is_partial(entry.name)
                or any(fnmatch.fnmatchcase(name, pattern) for pattern in kind.names)
            ):
                foreign.append(name)

    try:
        walk(path, "")
    except OSError:
        return None
    return foreign


def _show(path: Path) -> str:
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _writable_ancestor(path: Path) -> Path:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def check_target(path: str | Path, kind: FolderKind, force: bool, flag: str = "--out", writable: bool = True) -> bool:
    """Raise ConfigError unless edgetl may put a new ``kind`` folder at ``path``; True if an earlier one is replaced.

    Refused: the file system root, a symbolic link, a file, a folder edgetl cannot prove is its own (no marker with
    edgetl's schema), one holding anything edgetl did not write (even with ``force``), an earlier edgetl folder
    without ``force``, and (``writable``) a parent folder edgetl cannot write to.
    """
    from edgetl.errors import ConfigError

    path = Path(os.path.abspath(path))
    shown = _show(path)
    if not path.name:
        raise ConfigError(f"{flag} {shown} is the file system root", f"pass a new folder for the {kind.what}")
    if path.is_symlink():
        raise ConfigError(
            f"{flag} {shown} is a symbolic link; edgetl never writes through links",
            f"remove the link or pass the real folder ({_show(Path(os.path.realpath(path)))})",
        )
    replacing = False
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{flag} {shown} is a file", f"pass a folder path for the {kind.what}")
        if any(path.iterdir()):
            foreign = foreign_entries(path, kind)
            if foreign is None:
                proof = f" (no {kind.marker} with schema {kind.schema_prefix}*)" if kind.marker else ""
                raise ConfigError(
                    f"{flag} {shown} exists and is not an edgetl {kind.what}{proof}; edgetl replaces the whole folder",
                    "pick a new or empty folder",
                )
            if foreign:
                more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
                raise ConfigError(
                    f"{flag} {shown} holds files edgetl did not write ({', '.join(foreign[:3])}{more}), which "
                    f"replacing the {kind.what} would delete",
                    f"move them out of {shown}, or pick a new folder",
                )
            if not force:
                raise ConfigError(
                    f"{flag} {shown} holds an earlier edgetl {kind.what}",
                    "pass --force to replace it (with everything in it), or pick a new folder",
                )
            replacing = True
    if writable:
        parent = _writable_ancestor(path)
        if not os.access(parent, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            raise ConfigError(
                f"cannot write the {kind.what} into {_show(parent)} (read-only or no permission)",
                f"pass {flag} a folder you can write to",
            )
    return replacing


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str | Path, kind: FolderKind) -> None:
    """Tidy what killed edgetl processes left beside ``path``.

    ``.NAME.<random>.partial`` temp folders whose writer is dead are removed; a ``.NAME.old<pid>`` folder (moved
    aside by :func:`swap_dir`) is put back when ``path`` is gone, else removed if it is edgetl's own.
    """
    path = Path(os.path.abspath(path))
    parent = path.parent
    if not path.name or not parent.is_dir():
        return
    prefix = f".{path.name}."
    try:
        entries = [e for e in parent.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        rest = entry.name[len(prefix) :]
        if entry.is_symlink() or not entry.is_dir():
            continue
        if rest.endswith(".partial") and rest != "partial":  # atomic_dir's temp folder (not a resume_dir)
            try:
                pid = int((entry / PID_FILE).read_text().strip())
            except (OSError, ValueError):
                pid = -1
            if not _pid_alive(pid):
                shutil.rmtree(entry, ignore_errors=True)
        elif rest.startswith("old") and rest[3:].isdigit():
            if _pid_alive(int(rest[3:])) and int(rest[3:]) != os.getpid():
                continue
            if foreign_entries(entry, kind) != []:
                continue  # not provably edgetl's: leave it alone
            if not os.path.lexists(path):
                os.replace(entry, path)  # killed between the two renames of a swap: put the old folder back
            else:
                shutil.rmtree(entry, ignore_errors=True)


def swap_dir(tmp: str | Path, path: str | Path) -> None:
    """Put the finished folder ``tmp`` at ``path`` (same parent): the old one goes aside first, then is deleted."""
    tmp, path = Path(tmp), Path(os.path.abspath(path))
    old = None
    if os.path.lexists(path):
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resume_dir(path: str | Path) -> Path:
    """The work folder of a writer that resumes (finetune): ``.NAME.partial`` beside ``path``, a fixed name so that a
    rerun finds it. Unlike :func:`atomic_dir`'s temp folder it outlives a failed or killed writer (the writer decides
    when to delete it) and :func:`clean_stale` leaves it alone; it is swapped in with :func:`commit_dir`."""
    path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}.partial")


def commit_dir(
    tmp: str | Path,
    path: str | Path,
    kind: FolderKind | None,
    force: bool,
    flag: str = "--out",
    scratch: tuple[str, ...] = (),
) -> None:
    """Swap the finished folder ``tmp`` in at ``path``: with ``kind``, the target is checked again first
    (:func:`check_target`: nothing foreign may have appeared in it while ``tmp`` was built; on failure ``tmp`` is left
    as it was); then ``tmp``'s in-progress files ``scratch`` are removed and :func:`swap_dir` puts it in place."""
    if kind is not None:
        check_target(path, kind, force, flag)
    for name in scratch:
        (Path(tmp) / name).unlink(missing_ok=True)
    swap_dir(tmp, path)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_dir(
    path: str | Path, kind: FolderKind | None = None, force: bool = False, flag: str = "--out"
) -> Iterator[Path]:
    """Build a whole directory in a fresh private temp folder beside ``path``, then swap it in.

    A crash leaves the old one (or nothing); the next call cleans the temp folder up. With ``kind``, the target is
    checked (:func:`check_target`) before and again just before the swap.
    """
    path = Path(os.path.abspath(path))
    if kind is not None:
        check_target(path, kind, force, flag)
        clean_stale(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        (tmp / PID_FILE).write_text(str(os.getpid()))
        yield tmp
        commit_dir(tmp, path, kind, force, flag, scratch=(PID_FILE,))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def confined(root: str | Path, relpath: str) -> Path:
    """Resolve ``relpath`` inside ``root``; raise ValueError if it escapes (``..``, absolute, symlink out)."""
    root = Path(root).resolve()
    if not relpath or Path(relpath).is_absolute() or "\\" in relpath:
        raise ValueError(f"unsafe path {relpath!r}")
    target = (root / relpath).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"path {relpath!r} points outside {root}")
    return target
