"""Logs and entity tables -> labelled, split, encoded rows (``model.data.prepare``), served to the
trainer in batches (``model.data.loader``)."""

from model.data.loader import Dataset, Split, load_dataset, materialize, prepare_data
from model.data.prepare import (
    Exchange,
    Prepared,
    build_labels,
    check_same_features,
    label_columns,
    schema_from_config,
)
from model.data.source import (
    DataError,
    EntityTable,
    LogSource,
    file_fingerprint,
    load_entity_table,
    read_table,
)

__all__ = [
    "DataError",
    "Dataset",
    "EntityTable",
    "Exchange",
    "LogSource",
    "Prepared",
    "Split",
    "build_labels",
    "check_same_features",
    "file_fingerprint",
    "label_columns",
    "load_dataset",
    "load_entity_table",
    "materialize",
    "prepare_data",
    "read_table",
    "schema_from_config",
]
