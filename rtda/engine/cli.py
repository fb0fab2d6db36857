"""train.py's command line: parse the flags, train, turn the library's errors into one line and an exit code.

Exit codes: 0 done, 1 an error (printed as `error: ...`), 128 + signal number when SIGINT/SIGTERM stopped the
run after saving last.pt (130 / 143: a scheduler may requeue the job); 130 also for a second Ctrl-C, which stops
at once without saving (one line, no traceback).
"""
from __future__ import annotations

import argparse
import sys

from rtda.config import ConfigError, load_config
from rtda.datasets import DatasetError
from rtda.datasets.loaders import worker_message
from rtda.engine.monitor import StopRequest, TrainingDiverged
from rtda.engine.trainer import train
from rtda.runs import RunLockError
from rtda.utils.distributed import close_distributed
from rtda.utils.files import CheckpointError, os_error_line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a segmentation model (optionally with domain adaptation).")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3")
    parser.add_argument("--resume", default=None, help="`auto` (newest run of this config) or a checkpoint path")
    parser.add_argument("--work-dir", default="runs", help="where run folders are created (default: runs)")
    parser.add_argument("--apply-changes", action="store_true", help="on --resume: apply the overrides that "
                        "differ from the run's config from the resumed iteration on (logged in resume_log.jsonl)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = StopRequest()
    try:
        with stop:  # a SIGTERM while the run is being built still stops it cleanly after its first step
            cfg = load_config(args.config, args.overrides)
            train(cfg, work_dir=args.work_dir, resume=args.resume, apply_changes=args.apply_changes, stop=stop)
    except DatasetError as exc:
        print(f"error: {worker_message(exc)}\n  check every file with: python -m rtda.datasets --config {args.config} "
              f"--check", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, CheckpointError, TrainingDiverged, RunLockError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: no save now; every checkpoint written before is whole
        print("interrupted by a second Ctrl-C without saving; checkpoints written before are intact (--resume auto "
              "continues from the last one)", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk or an unwritable path when the run folder is made (nothing is left)
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    finally:
        close_distributed(stopped=stop.joint)  # not a signal that reached one rank after the loop
    return 128 + stop.signum if stop.signum else 0  # 130 / 143: a scheduler may requeue the job


if __name__ == "__main__":
    sys.exit(main())
