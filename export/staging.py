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


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yields an empty directory to write into; on a clean exit it becomes `final`."""
    final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
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
