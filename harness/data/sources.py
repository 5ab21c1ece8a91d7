"""Reading files out of an import source: a folder, a tar archive (any compression) or a zip archive."""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

from harness.errors import UsageError

Wanted = Callable[[PurePosixPath], bool]


def _hidden(path: PurePosixPath) -> bool:
    """Dot files and macOS archive debris (``__MACOSX/``, ``._x``) are never data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.parts)


def read_files(path: Path, wanted: Wanted) -> dict[PurePosixPath, bytes]:
    """Bytes of every regular file under ``path`` whose relative path passes ``wanted``.

    Tar archives are read as one sequential stream, so a compressed archive is decompressed once.
    """
    if path.is_dir():
        found = {}
        for file in sorted(path.rglob("*")):
            rel = PurePosixPath(file.relative_to(path).as_posix())
            if file.is_file() and not _hidden(rel) and wanted(rel):
                found[rel] = file.read_bytes()
        return found
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return {PurePosixPath(i.filename): archive.read(i) for i in archive.infolist()
                    if not i.is_dir() and not _hidden(PurePosixPath(i.filename))
                    and wanted(PurePosixPath(i.filename))}
    if tarfile.is_tarfile(path):
        found = {}
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                rel = PurePosixPath(member.name)
                if member.isfile() and not _hidden(rel) and wanted(rel):
                    found[rel] = archive.extractfile(member).read()
        return found
    raise UsageError(f"{path} is neither a folder nor a .tar/.tar.gz/.zip archive")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
