"""Reading token corpora written by ``data_prep``: memory-mapped shards and batches.

    from sparse_moe.data import open_corpus, LMBatches, TranslationBatches
    corpus = open_corpus("corpora/wt2", tokenizer="tok/wt2.model")   # refuses another tokenizer
    batches = LMBatches(corpus.split("train"), batch_size=32, seq_len=128,
                        rank=rank, world_size=world_size, seed=1234)
    for batch in batches:          # batch.tokens: int64 [32, 129]; .inputs / .targets [32, 128]
        ...
    state = batches.state_dict()   # resume at the exact next batch with load_state_dict(state)
"""

from .corpus import Corpus, CorpusError, SplitData, TokenStream, open_corpus, verify_corpus
from .indexed import IndexedShard, ShardFormatError, token_dtype
from .lm import LMBatch, LMBatches
from .tokenizer import SentencePieceTokenizer, TokenizerError, WordTokenizer, load_tokenizer
from .translation import TranslationBatch, TranslationBatches

__all__ = ["Corpus", "CorpusError", "IndexedShard", "LMBatch", "LMBatches",
           "SentencePieceTokenizer", "ShardFormatError", "SplitData", "TokenStream",
           "TokenizerError", "TranslationBatch", "TranslationBatches", "WordTokenizer", "load_tokenizer",
           "open_corpus", "token_dtype", "verify_corpus"]
