"""Models over injected TorchRec EmbeddingBagCollections (installed as c2al.models)."""
