"""All-or-nothing output directories.

Everything is written into a hidden sibling directory; only a complete result is renamed
into place, replacing any previous one, so an interrupted or failed export leaves the old
output untouched and no half-written artifacts anywhere. rename(2) of a directory within
one filesystem is atomic; the old output is moved aside first because a directory rename
cannot replace a non-empty directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from nearvoice.export.errors import ExportError


def replaceable(final: Path, marker: str) -> bool:
    return final.is_dir() and (not any(final.iterdir()) or (final / marker).is_file())


def _remove_abandoned(final: Path) -> None:
    """Staging and old directories of runs that were killed (their process is gone)."""
    for path in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = path.name.rpartition("-")
        if not (kind.endswith((".staging", ".old")) and pid.isdigit()):
            continue
        if int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: Path, marker: str) -> Iterator[Path]:
    """Yields an empty directory to write into; on a clean exit it becomes `final`.

    `final` is replaced only when it is empty or holds `marker` (a previous result of
    the same step): `--out .` must never wipe a project."""
    final = final.resolve()
    if final.exists() and not replaceable(final, marker):
        raise ExportError(
            f"refusing to replace {final}: it is not empty and holds no {marker} "
            "(choose a new directory, or a previous output of this step)"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    staging = final.with_name(f".{final.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
