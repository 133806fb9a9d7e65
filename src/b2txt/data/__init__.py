"""Data layer: the Dryad HDF5 format, validation, the block description, the manifest and
the in-memory trial store used for training."""

from .description import Block, read_description, write_description
from .dryad import (
    N_FEATURES, SPLITS, DataFile, Trial, data_file_path, discover, read_file, read_trial,
    session_date, session_name, write_trials,
)
from .validate import ValidationReport, validate_dataset

__all__ = [
    "Block", "DataFile", "N_FEATURES", "SPLITS", "Trial", "ValidationReport", "data_file_path",
    "discover", "read_description", "read_file", "read_trial", "session_date", "session_name",
    "validate_dataset", "write_description", "write_trials",
]
