"""What a checkpoint or export that cannot be read as asked raises (a user's input error)."""


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded into this run as it is configured."""


class ExportError(ValueError):
    """A run, checkpoint or export directory that cannot be read as asked."""
