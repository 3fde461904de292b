"""The one output-safety rule of every command that writes (predict, adapt, evaluate): checked before any work,
so that a refused output costs nothing and nothing the user owns is lost.

- never write over a file the command reads, nor into a folder it reads from (a labels folder, the data);
- never replace an existing file that the command did not write itself (``ours`` tells; nnU-Net and
  TotalSegmentator overwrite silently, and a user's own file of the same name is then gone);
- never let two outputs share one name (the second would silently replace the first);
- find an unwritable destination before the work, not after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from arenaseg.utils.errors import UserError


def check_outputs(
    outputs: Sequence[Path],
    *,
    reads: Sequence[Path] = (),
    sources: Sequence[Path] | None = None,
    ours: Callable[[Path], bool] | None = None,
    kind: str = "a file this command wrote",
    what: str = "output",
) -> None:
    """Refuse, naming the path, any of ``outputs`` that breaks the rule. ``reads``: the files and folders the
    command reads; ``sources``: what each output is made from (named when two outputs collide); ``ours``: whether
    an existing file is one this command wrote (``kind`` describes it in the message)."""
    read = {_resolved(p) for p in reads}
    seen: dict[Path, int] = {}
    for i, dst in enumerate(outputs):
        target = _resolved(dst)
        if target in read:
            raise UserError(f"{what} {dst} is one of the inputs or of the files this command reads; choose another")
        if target.parent in read:
            raise UserError(f"{what} {dst} lies in {dst.parent}, a folder this command reads from; choose another")
        if target in seen:
            first, second = (sources[seen[target]], sources[i]) if sources else (outputs[seen[target]], dst)
            raise UserError(f"{first} and {second} would both be written to {dst}; rename one of them")
        seen[target] = i
        if dst.is_dir():
            raise UserError(f"{what} {dst} is an existing folder; give a file name")
        if (dst.exists() or dst.is_symlink()) and (ours is None or not ours(dst)):
            raise UserError(f"{what} {dst} exists and is not {kind}; not overwriting it (remove it or choose another)")
    for folder in sorted({_resolved(p).parent for p in outputs}):
        check_writable(folder, what)


def check_writable(folder: Path, what: str = "output") -> None:
    """Create and remove a file in ``folder`` (or check its nearest existing parent): permissions, read-only
    mounts and immutable folders show up now rather than after the work."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if existing != folder:
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(f"cannot create folders in {existing}")
            return
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"{what} folder {folder} is not writable: {err}") from None


@contextlib.contextmanager
def hold_folder(folder: Path, what: str = "--output") -> Iterator[None]:
    """An exclusive, non-blocking ``fcntl.flock`` on an output folder for a command's whole life: a second
    process writing into it fails at once instead of mixing its files with the first's."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{what} {folder} is in use by another arenaseg process; wait for it to finish or choose another"
            ) from None
        yield
    finally:
        os.close(fd)


def _resolved(path: Path) -> Path:
    """The absolute path, symlinks followed where they resolve (a loop is left as it is, not raised)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))
