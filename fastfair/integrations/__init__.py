"""Adapters of fastfair's hashed tables to other libraries, each imported on use:

* ``fastfair.integrations.torchrec``: ``HashedEmbeddingBagCollection``, a TorchRec
  ``EmbeddingBagCollection`` over hashed arrays (needs ``torchrec``).

Federated training over Flower is ``fastfair.fl.flower``.
"""
