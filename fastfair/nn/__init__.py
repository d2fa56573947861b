"""Drop-in ``torch.nn`` modules backed by hashed, collapsible arrays, and ``replace_embeddings``
to swap them into an existing model."""
from .modules import HashedEmbedding, HashedEmbeddingBag
from .replace import ReplaceReport, TableReport, replace_embeddings

__all__ = ["HashedEmbedding", "HashedEmbeddingBag", "ReplaceReport", "TableReport",
           "replace_embeddings"]
