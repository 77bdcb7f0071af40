"""The WikiText-2 corpus fixture of the training tests, for the training runs here."""

from tests.train.conftest import wt_corpus  # noqa: F401
