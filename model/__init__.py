"""mtrank offline half: data, multi-task networks, trainer, checkpoints.

The public API the online service uses is re-exported here and kept small.
"""

from model.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    IncompleteCheckpointError,
    TamperedCheckpointError,
    check_version_id,
    list_versions,
    load_checkpoint,
    read_latest,
    resolve_checkpoint,
    write_latest,
)
from model.features import CanonicalRows, FeatureError, FeatureSchema, FeatureSpec, stable_hash
from model.scoring import Combine, Ranker, combine_for, combine_scores

__all__ = [
    "CanonicalRows",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "Combine",
    "CorruptCheckpointError",
    "FeatureError",
    "FeatureSchema",
    "FeatureSpec",
    "IncompatibleCheckpointError",
    "IncompleteCheckpointError",
    "Ranker",
    "TamperedCheckpointError",
    "check_version_id",
    "combine_for",
    "combine_scores",
    "list_versions",
    "load_checkpoint",
    "read_latest",
    "resolve_checkpoint",
    "stable_hash",
    "write_latest",
]
