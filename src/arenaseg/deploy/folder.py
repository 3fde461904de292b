"""Export folders written aside and renamed into place: a failed or killed export never leaves a half-written
bundle under its final name, and --overwrite replaces only an earlier export, never some other folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from arenaseg.utils.errors import UserError

# Written into every export: what --overwrite may replace (a folder without it is never deleted).
EXPORT_FILE = "arenaseg_export.json"


def check_export_target(out: Path, overwrite: bool, protected: Sequence[Path] = ()) -> None:
    """Refuse before any work: a file, a non-empty folder (unless --overwrite and it holds an earlier export), and a
    folder that is or holds one of ``protected`` (the run itself)."""
    resolved = out.resolve()
    for path in protected:
        path = path.resolve()
        if resolved == path or resolved in path.parents:
            raise UserError(f"--out {out} is or contains the run folder {path}; choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} is not empty; choose an empty or new folder, or pass --overwrite")
        if not (out / EXPORT_FILE).is_file():
            raise UserError(f"--out {out} is not empty and holds no earlier export ({EXPORT_FILE}); not replacing it")


@contextlib.contextmanager
def export_folder(out: Path, overwrite: bool, protected: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a hidden folder beside ``out`` to write into; on success it becomes ``out`` (an earlier export there is
    removed only after the new one is in place), on failure it is removed."""
    check_export_target(out, overwrite, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield work
        _share(work)
        check_export_target(out, overwrite, protected)  # again: another process may have written there meanwhile
        old = None
        if out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)
        elif out.is_dir():
            out.rmdir()
        os.replace(work, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _share(folder: Path) -> None:
    """The umask's permissions, not mkstemp's private 0600/0700: an export is made to be handed on."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
