"""Downloading a dataset's official release (``harness data fetch NAME``), checked, then imported.

A release is one archive (CIFAR) or several files under one base URL (the four IDX files of MNIST
and Fashion-MNIST); every file is checked against its md5 before anything is imported.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Union
from urllib.parse import urlparse

from tqdm import tqdm

from harness.data import disk
from harness.data.catalog import PickleRelease, Release, catalog_entry
from harness.data.datasets import MIRROR_ENV, import_from
from harness.core.errors import UsageError
from harness.core.paths import data_root

URL_ENV = "HARNESS_DATA_URL_{}"  # formatted with the dataset name, upper-cased, "-" -> "_"
Digests = Union[str, Mapping[str, str], None]  # one digest (single-file release) or file name -> digest


def url_env(name: str) -> str:
    """The environment variable that overrides ``name``'s download URL."""
    return URL_ENV.format(name.upper().replace("-", "_"))


def fetch_dataset(name: str, root: str | os.PathLike | None = None, url: str | None = None,
                  progress: bool = True, *, md5: Digests = None, sha256: Digests = None) -> Path:
    """Download, verify and import the official release of ``name``; return the dataset's folder.

    The URL is ``url``, else ``$HARNESS_DATA_URL_<NAME>``, else the official one; for a release of
    several files it is the folder URL the files are under. Each download must match ``md5``/``sha256``
    when given (for several files: a mapping file name -> digest), else the official md5 (so a mirror
    must serve the official files). A mismatch raises UsageError and deletes the downloads.
    """
    entry = catalog_entry(name)
    if entry.official is None:
        raise UsageError(f"`harness data fetch {name}` cannot download it: {entry.how_to_get}")
    release = entry.official
    url = url or os.environ.get(url_env(name))
    urls = _file_urls(release, url)
    expected = _expected(release, md5, sha256)
    root = data_root(root)
    with disk.locked(root, name):
        folder = Path(tempfile.mkdtemp(prefix=f".{name}.download-", dir=root))
        try:
            for file, file_url in urls.items():
                digests = _download(file_url, folder / file, name, progress)
                for algorithm, want in expected[file].items():
                    if digests[algorithm] != want.lower():
                        raise UsageError(
                            f"checksum mismatch for {file_url}: expected {algorithm} {want}, got "
                            f"{digests[algorithm]}; the download was deleted and nothing was imported")
            if isinstance(release, PickleRelease):
                [(file, file_url)] = urls.items()
                import_from(entry, folder / file, root, progress,
                            original=PurePosixPath(urlparse(file_url).path).name, url=file_url)
            else:
                base = _folder_url(url or release.base_url)
                import_from(entry, folder, root, progress, original=base, url=base)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return root / name


def _folder_url(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _file_urls(release: Release, url: str | None) -> dict[str, str]:
    """File name -> URL to download it from (``url`` is the archive's URL, or the IDX files' folder URL)."""
    if isinstance(release, PickleRelease):
        return {file: url or release.url for file in release.downloads()}
    base = _folder_url(url or release.base_url)
    return {file: base + file for file in release.downloads()}


def _expected(release: Release, md5: Digests, sha256: Digests) -> dict[str, dict[str, str]]:
    """File name -> {algorithm: expected hex digest}."""
    official = release.downloads()
    if not md5 and not sha256:
        return {file: {"md5": digest} for file, digest in official.items()}
    expected: dict[str, dict[str, str]] = {file: {} for file in official}
    for algorithm, given in (("md5", md5), ("sha256", sha256)):
        if not given:
            continue
        if isinstance(given, str):
            if len(official) != 1:
                raise UsageError(f"this release has {len(official)} files ({', '.join(official)}): give "
                                 f"{algorithm} as a mapping file name -> digest")
            given = {next(iter(official)): given}
        unknown = sorted(set(given) - set(official))
        if unknown:
            raise UsageError(f"no release file named {', '.join(unknown)}; valid: {', '.join(official)}")
        for file, digest in given.items():
            expected[file][algorithm] = digest
    missing = [file for file, digests in expected.items() if not digests]
    if missing:
        raise UsageError(f"no {'/'.join(a for a, g in (('md5', md5), ('sha256', sha256)) if g)} given for "
                         f"{', '.join(missing)}")
    return expected


def _download(url: str, target: Path, name: str, progress: bool) -> dict[str, str]:
    """Stream ``url`` to ``target``; return its md5 and sha256."""
    digests = {"md5": hashlib.md5(usedforsecurity=False), "sha256": hashlib.sha256()}
    try:
        with target.open("wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                      desc=f"downloading {target.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    for digest in digests.values():
                        digest.update(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise UsageError(
            f"could not download {url}: {exc}; get the release another way and run "
            f"`harness data import {name} PATH`, or set {MIRROR_ENV} to a folder holding it") from exc
    return {algorithm: digest.hexdigest() for algorithm, digest in digests.items()}
