"""mtrank offline half: data, multi-task networks, trainer, checkpoints.

The public API the online service uses is re-exported here (import-linter holds the service to it,
plus ``model.cli`` and ``model.replay``, the offline tools it hosts).
"""

from model.checkpoint import (
    LATEST,
    Checkpoint,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    IncompleteCheckpointError,
    TamperedCheckpointError,
    check_version_id,
    clean_stale_temp,
    list_versions,
    load_checkpoint,
    models_dir,
    read_latest,
    resolve_checkpoint,
    write_latest,
)
from model.config import Config, ConfigError, DataConfig, load_config
from model.data import DataError, LogSource, prepare_data, read_table
from model.data.history import load_event_tables
from model.data.loader import sharded
from model.features import (
    CanonicalRows,
    FeatureError,
    FeatureSchema,
    FeatureSpec,
    SequenceSpec,
    canonical_str,
    object_values,
    stable_hash,
)
from model.scoring import Combine, Ranker, combine_for, combine_scores
from model.sequences import EventTable, UserHistory, is_event, pack_events, unpack_events
from model.train import predict

__all__ = [
    "LATEST",
    "CanonicalRows",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "Combine",
    "Config",
    "ConfigError",
    "CorruptCheckpointError",
    "DataConfig",
    "DataError",
    "EventTable",
    "FeatureError",
    "FeatureSchema",
    "FeatureSpec",
    "IncompatibleCheckpointError",
    "IncompleteCheckpointError",
    "LogSource",
    "Ranker",
    "SequenceSpec",
    "TamperedCheckpointError",
    "UserHistory",
    "canonical_str",
    "check_version_id",
    "clean_stale_temp",
    "combine_for",
    "combine_scores",
    "is_event",
    "list_versions",
    "load_checkpoint",
    "load_config",
    "load_event_tables",
    "models_dir",
    "object_values",
    "pack_events",
    "predict",
    "prepare_data",
    "read_latest",
    "read_table",
    "resolve_checkpoint",
    "sharded",
    "stable_hash",
    "unpack_events",
    "write_latest",
]
