"""Tasks, task streams and their readers, the built-in benchmarks, and per-task scoring."""

from .builtin import BUILTIN_STREAMS, ENV_VAR, SAMPLE_ROOT, resolve_data_root
from .errors import DataRootError, DataValidationError
from .readers import load_task, read_label_set, read_records
from .sampling import subsample
from .scoring import score
from .streams import Stream, load_stream
from .tasks import Example, Task

__all__ = [
    "BUILTIN_STREAMS", "ENV_VAR", "SAMPLE_ROOT", "DataRootError", "DataValidationError", "Example", "Stream", "Task",
    "load_stream", "load_task", "read_label_set", "read_records", "resolve_data_root", "score", "subsample",
]
