"""Moving a unit (one or more top-level members) into a destination folder, atomically.

A move goes through a staging folder inside the destination folder (a dot-name, so the
library scan never sees it), in three idempotent steps the pipeline records between:

1. :func:`stage` — each member into ``STAGING/NAME``: ``os.rename`` when source and
   destination share a filesystem; otherwise copy to ``STAGING/NAME.part``, fsync every
   file and folder, rename to ``STAGING/NAME``, and verify the staged content hash equals
   the source's. Members already staged (or already published) are left alone.
2. :func:`remove_sources` — after a verified copy, the source members are removed
   (the move across filesystems); nothing else is ever removed.
3. :func:`publish` — each staged member renamed to its final name, data folders before the
   main file, so the slide appears complete or not at all.

Any step can be cut by a crash and run again from the start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from wsi_server.ingest.faults import fault

STAGING_DIR = ".wsi-ingest-staging"
_CHUNK = 4 * 2**20


class MoveError(Exception):
    """A member is nowhere to be found, or a copy did not verify."""


def content_hash(paths: Sequence[Path]) -> tuple[str, int]:
    """SHA-256 over the contents of a unit's members, and their total size.

    Top-level names do not count (the same scan dropped under a new name is the same
    content); paths inside a member folder do.
    """
    h = hashlib.sha256()
    total = 0
    for index, top in enumerate(paths):
        files = sorted(f for f in top.rglob("*") if f.is_file()) if top.is_dir() else [top]
        for f in files:
            inner = f.relative_to(top).as_posix() if f != top else ""
            h.update(f"{index}/{inner}\0".encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
                    total += len(chunk)
            h.update(b"\0")
    return h.hexdigest(), total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        first = True
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
            if first:
                fout.flush()
                fault("copy-mid")
                first = False
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, dst)


def _copy_tree(src: Path, dst: Path) -> None:
    if src.is_dir():
        dst.mkdir()
        for child in sorted(src.iterdir()):
            _copy_tree(child, dst / child.name)
        shutil.copystat(src, dst)
        _fsync_dir(dst)
    else:
        _copy_file(src, dst)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def needs_copy(src: Path, dest_dir: Path) -> bool:
    """True when ``src`` and ``dest_dir`` are on different filesystems."""
    return os.stat(src).st_dev != os.stat(dest_dir).st_dev


def staging_for(dest_dir: Path, scan_id: int) -> Path:
    return dest_dir / STAGING_DIR / str(scan_id)


def stage(
    sources: Sequence[Path], finals: Sequence[Path], staging: Path, copy: bool,
    expected_hash: str | None,
) -> None:
    """Step 1: every member into ``staging`` (see the module docstring)."""
    staging.mkdir(parents=True, exist_ok=True)
    for src, final in zip(sources, finals, strict=True):
        staged = staging / final.name
        if staged.exists() or final.exists():
            continue
        if not (src.exists() or src.is_symlink()):
            raise MoveError(f"{src.name} is neither in the watch folder nor staged")
        if not copy:
            try:
                os.rename(src, staged)
                fault("staged-one")
                continue
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                copy = True
        part = staging / (final.name + ".part")
        _remove_tree(part)  # our own unfinished copy from before a crash; source intact
        _copy_tree(src, part)
        _fsync_dir(staging)
        os.rename(part, staged)
        fault("staged-one")
    _fsync_dir(staging)
    if copy and expected_hash is not None:
        here = [staging / f.name if (staging / f.name).exists() else f for f in finals]
        got, _ = content_hash(here)
        if got != expected_hash:
            raise MoveError("the copy does not match the source (content hash differs)")


def remove_sources(sources: Sequence[Path], finals: Sequence[Path], staging: Path) -> None:
    """Step 2, after a verified copy: the source members go, now that a copy is staged."""
    for final in finals:
        if not ((staging / final.name).exists() or final.exists()):
            raise MoveError(f"refusing to remove the source of {final.name}: no staged copy")
    for src in sources:
        _remove_tree(src)
        fault("source-removed-one")
    for parent in {s.parent for s in sources}:
        if parent.exists():
            _fsync_dir(parent)


def publish(finals: Sequence[Path], staging: Path) -> None:
    """Step 3: staged members to their final names, folders first, main member last."""
    order = sorted(range(len(finals)), key=lambda i: (i == 0, i))
    for i in order:
        final = finals[i]
        staged = staging / final.name
        if final.exists() and not staged.exists():
            continue
        if final.exists():
            raise MoveError(f"{final.name} appeared at the destination meanwhile")
        os.rename(staged, final)
        fault("published-one")
    _fsync_dir(finals[0].parent)
    for d in (staging, staging.parent):
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty


def free_name(dest_dir: Path, names: Sequence[str], taken: set[str]) -> list[str]:
    """``names`` (main member first), suffixed ``-2``, ``-3``... until none is in use.

    Suffixes go before the extension and are the same for every member, so an MRXS file
    and its data folder keep matching names.
    """
    def with_suffix(name: str, n: int) -> str:
        if n == 1:
            return name
        stem, dot, ext = name.partition(".") if not name.startswith(".") else (name, "", "")
        return f"{stem}-{n}{dot}{ext}"

    n = 1
    while True:
        candidate = [with_suffix(name, n) for name in names]
        if not any((dest_dir / c).exists() or (dest_dir / c).is_symlink()
                   or str(dest_dir / c) in taken for c in candidate):
            return candidate
        n += 1
