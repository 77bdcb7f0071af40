"""Data preparation: SentencePiece tokenizers and sharded, verified token corpora.

Run ``python -m data_prep --help``. The corpora it writes are read by ``sparse_moe.data``.
"""
