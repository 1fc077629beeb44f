"""Writing a folder whole: the target checked first, the content written into a staging folder beside
it and renamed into place, so a reader never sees half a folder and a failure leaves the old one."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from condense.errors import CondenseError


def target_folder(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` made absolute, refused when it is a file or (unless ``overwrite``) not empty."""
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise CondenseError(f"--to {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CondenseError(f"--to {out_dir} is not empty; pass --overwrite to replace it")
    return out_dir


def replace_folder(staging: Path, out_dir: Path) -> None:
    """Put ``staging`` at ``out_dir``; what was there is removed only once the new folder is in."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
        os.rename(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out_dir)
