"""Drop-in ``torch.nn`` modules backed by hashed, collapsible arrays, and ``replace_embeddings``
to swap them into an existing model; ``LSHOutputLayer``, an output layer trained on
LSH-selected neurons (PGHash)."""
from .lsh import LSHFamily, LSHOutput, LSHOutputLayer
from .modules import HashedEmbedding, HashedEmbeddingBag
from .replace import ReplaceReport, TableReport, replace_embeddings

__all__ = ["HashedEmbedding", "HashedEmbeddingBag", "LSHFamily", "LSHOutput", "LSHOutputLayer",
           "ReplaceReport", "TableReport", "replace_embeddings"]
