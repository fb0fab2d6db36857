"""What the experiment runners share: their error type, where the synthetic configs live, a file's digest."""
from __future__ import annotations

import hashlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = REPO_ROOT / "configs" / "synthetic"


class ExperimentError(ValueError):
    """A bad argument, work dir or run of an experiment; the message is one line naming it."""


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
