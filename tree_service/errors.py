"""Errors of the tree service. Plain exceptions so they cross Ray's boundary intact."""


class TreeServiceError(Exception):
    """Base class: every refusal of the tree library or service."""


class VersionConflict(TreeServiceError):
    """A write named a version that is no longer the stream's current one."""

    def __init__(self, stream: str, expected: int, current: int, detail: str = ""):
        self.stream, self.expected, self.current = stream, expected, current
        super().__init__(
            f"stream {stream!r}: write expected version {expected} but the current version is "
            f"{current}{': ' + detail if detail else ''}; re-read the snapshot and retry"
        )

    def __reduce__(self):  # keep the fields when Ray re-raises it in the caller
        return (type(self), (self.stream, self.expected, self.current))


class VersionExists(TreeServiceError):
    """Storage already holds this version: another writer created it first."""


class TaskConflict(TreeServiceError):
    """A task id already exists in the stream with different content."""


class InvalidSignature(TreeServiceError):
    """A signature of the wrong shape, dtype or with non-finite values."""


class SnapshotFormatError(TreeServiceError):
    """A stored snapshot does not match the expected schema; names the file and field."""


class UnknownStream(TreeServiceError, KeyError):
    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])
