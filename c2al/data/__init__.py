"""Data side: schema and tables, batches, and the three sources (MovieLens, tabular files, synthetic)."""
from c2al.data.batch import Batch, iter_batches, make_batch
from c2al.data.schema import JaggedColumn, Schema, SparseFeature, Splits, Table

__all__ = ["Batch", "JaggedColumn", "Schema", "SparseFeature", "Splits", "Table", "iter_batches", "make_batch"]
