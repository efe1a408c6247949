"""Extracting an MVTec `.tar.xz` once, completely or not at all.

The archive is extracted into a temporary folder next to its final place and renamed into place only
when every member is out, with a manifest of how many files each folder holds. A reused extraction is
checked against that manifest, so a half-extracted or thinned copy is never built from.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import tarfile
import tempfile
import zlib
from collections import Counter
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from .errors import MVTecCaptionError

MANIFEST = ".mvtec_caption_extracted.json"


def _key(archive: Path) -> str:
    stat = archive.stat()
    return hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _file_counts(root: Path) -> Counter:
    return Counter(
        p.parent.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def _check_against_manifest(folder: Path, archive: Path) -> None:
    try:
        expected = json.loads((folder / MANIFEST).read_text())["files_per_folder"]
    except (OSError, ValueError, KeyError) as err:
        raise MVTecCaptionError(
            f"Extracted copy {folder} of archive {archive} has no readable manifest; delete {folder} to extract again"
        ) from err
    found = _file_counts(folder)
    for where, n in sorted(expected.items()):
        if found.get(where, 0) != n:
            raise MVTecCaptionError(
                f"Extracted copy {folder} of archive {archive}: {where} holds {found.get(where, 0)} of the "
                f"archive's {n} files; delete {folder} to extract again"
            )


def extract_archive(archive: str | Path, cache_dir: str | Path) -> Path:
    """The extracted tree of `archive` under `cache_dir`: reused when complete, else extracted afresh."""
    archive, cache_dir = Path(archive), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"{archive.name}-{_key(archive)}"
    with FileLock(str(final) + ".lock"):
        if final.is_dir():
            _check_against_manifest(final, archive)
            return final
        for leftover in cache_dir.glob(f".{final.name}.partial-*"):  # killed earlier runs; ours by name
            shutil.rmtree(leftover, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=cache_dir))
        try:
            counts: Counter = Counter()
            with tarfile.open(archive, "r:*") as tar:
                for member in tqdm(tar, desc=f"Extracting {archive.name}", unit=" files", disable=None):
                    tar.extract(member, partial, filter="data")
                    if member.isfile():
                        counts[Path(member.name).parent.as_posix()] += 1
            (partial / MANIFEST).write_text(json.dumps({"archive": str(archive), "files_per_folder": counts}))
            partial.rename(final)
        except (tarfile.TarError, EOFError, lzma.LZMAError, OSError, zlib.error) as err:
            raise MVTecCaptionError(
                f"Archive {archive} could not be extracted; it is truncated or damaged "
                f"({type(err).__name__}: {err}). Download it again."
            ) from err
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return final
