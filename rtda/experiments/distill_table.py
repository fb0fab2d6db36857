"""The synthetic distillation table: BiSeNet-R18 distilled from an adapted teacher (by default the BiSeNet-R101 of
configs/synthetic/gta5_bisenet_r101_daformer_dacs.yaml), against the same student adapted on its own with DACS and
with DAFormer-DACS, and the teacher itself, over seeds.

    python -m rtda.experiments.distill_table --seeds 0 1 2 [--teacher NAME] [--rows NAME ...] [key=value ...]

Each run is a `train.py` process, one at a time, in seed order (teacher, student by distillation, DACS,
DAFormer-DACS for seed 0 first), the student of seed N distilling the teacher of seed N (its last.pt); a teacher that
is one of the rows (`--teacher gta5_bisenet_daformer_dacs`) trains once. Finished runs are reused and an interrupted
one resumes (rtda.experiments.synthetic_table's queue and work-dir stamp); the table is written to
WORK_DIR/table.md (default runs/distill_table_TEACHER) after every finished run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from rtda.experiments.common import SYNTHETIC, ExperimentError
from rtda.experiments.synthetic_table import check_work_dir, finished_runs, train_runs
from rtda.utils.files import atomic_write_text

TEACHER, STUDENT = "gta5_bisenet_r101_daformer_dacs", "gta5_bisenet_distill"
SELF_TRAINED = ("gta5_bisenet_dacs", "gta5_bisenet_daformer_dacs")


def rows(teacher: str) -> tuple[str, ...]:
    """The table's rows in training order: the teacher, the distilled student, the student's own adaptations."""
    return tuple(dict.fromkeys((teacher, STUDENT, *SELF_TRAINED)))


def run_distill_table(work_dir: Path, seeds: list[int], overrides: list[str], threads: int | None = None,
                      teacher: str = TEACHER, only: list[str] | None = None) -> str:
    """Train the missing runs of `rows(teacher)` (or of `only`, a subset of them: the student's own DACS and
    DAFormer-DACS rows do not depend on the teacher, so a second teacher's table can leave them to the first's) for
    each seed, one process at a time; return the markdown table (also in work_dir/table.md). Raises RuntimeError
    listing the runs that failed once the others have finished."""
    if not (SYNTHETIC / f"{teacher}.yaml").is_file():
        raise ExperimentError(f"--teacher {teacher}: no configs/synthetic/{teacher}.yaml")
    unknown = sorted(set(only or ()) - set(rows(teacher)))
    if unknown:
        raise ExperimentError(f"--rows {' '.join(unknown)}: not a row of this table; expected some of "
                              f"{', '.join(rows(teacher))}")
    check_work_dir(work_dir, overrides)
    results = finished_runs(work_dir)

    def refresh():
        results.update(finished_runs(work_dir))
        write_table(work_dir, results, teacher)

    failed = []
    for seed in seeds:
        for name in rows(teacher):
            if (name, seed) in results or (only and name not in only):
                continue
            extra = []
            if name == STUDENT:
                if (teacher, seed) not in results:
                    failed.append(f"{STUDENT} seed {seed} skipped: its teacher ({teacher} seed {seed}) did not finish")
                    continue
                extra = [f"adapt.teacher.config={SYNTHETIC / f'{teacher}.yaml'}",
                         f"adapt.teacher.checkpoint={results[teacher, seed]['run_dir'] / 'last.pt'}"]
            failed += train_runs([(name, seed, extra)], overrides, work_dir, 1, threads, refresh)
    refresh()
    if failed:
        raise RuntimeError("\n".join(failed))
    return (work_dir / "table.md").read_text()


def write_table(work_dir: Path, results: dict, teacher: str = TEACHER) -> None:
    """Per row: mean ± sample std of the final mIoU over seeds, the difference to the student's DACS row, the seeds'
    values and the mean wall time of a run."""
    by_row = {row: sorted((seed, m) for (name, seed), m in results.items() if name == row) for row in rows(teacher)}
    means = {row: statistics.mean(m["final"]["mIoU"] for _, m in runs) for row, runs in by_row.items() if runs}
    lines = ["| Run | Seeds | mIoU (mean ± std) | vs student DACS | per seed | train time per run (s) |",
             "|---|---|---|---|---|---|"]
    for row in rows(teacher):
        if not by_row[row]:
            continue
        vals = [m["final"]["mIoU"] for _, m in by_row[row]]
        std = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
        dacs = means.get("gta5_bisenet_dacs")
        gain = f"{means[row] - dacs:+.1f}" if dacs is not None and row != "gta5_bisenet_dacs" else ""
        wall = statistics.mean(m["wall_time_s"] for _, m in by_row[row])
        lines.append(f"| {row} | {len(vals)} | {means[row]:.1f}{std} | {gain} | "
                     f"{', '.join(f'{v:.1f}' for v in vals)} | {wall:.0f} |")
    atomic_write_text(work_dir / "table.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtda.experiments.distill_table",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="default: runs/distill_table_TEACHER")
    parser.add_argument("--teacher", default=TEACHER, help=f"synthetic config of the teacher (default {TEACHER})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=None, metavar="CONFIG_NAME",
                        help="train only these rows (default: every row)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each run (default: every core)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    args = parser.parse_args(argv)
    try:
        work_dir = args.work_dir or Path(f"runs/distill_table_{args.teacher}")
        print(run_distill_table(work_dir, args.seeds, args.overrides, args.threads, args.teacher, args.rows))
    except (ExperimentError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
