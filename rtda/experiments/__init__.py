"""Experiment runners: commands that train and tabulate (the synthetic adaptation table, the synthetic backbone)."""
from rtda.experiments.common import ExperimentError
from rtda.experiments.pretrain_backbone import PRETRAIN_DEFAULTS, pretrain_synthetic_backbone
from rtda.experiments.synthetic_table import run_adaptation_table

__all__ = ["PRETRAIN_DEFAULTS", "ExperimentError", "pretrain_synthetic_backbone", "run_adaptation_table"]
