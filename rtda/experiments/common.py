"""What the experiment runners share: their error type and where the synthetic configs live."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = REPO_ROOT / "configs" / "synthetic"


class ExperimentError(ValueError):
    """A bad argument, work dir or run of an experiment; the message is one line naming it."""
