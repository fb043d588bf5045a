"""Data side: schema and tables, batches, and the three sources (MovieLens, tabular files, synthetic)."""
from c2al.data.batch import Batch, iter_batches, make_batch
from c2al.data.movielens import load_movielens
from c2al.data.schema import JaggedColumn, Schema, SparseFeature, Splits, Table
from c2al.data.sources import load_source
from c2al.data.synthetic import SyntheticConfig, SyntheticGenerator, make_synthetic_splits
from c2al.data.tabular import load_tabular

__all__ = [
    "Batch", "JaggedColumn", "Schema", "SparseFeature", "Splits", "SyntheticConfig", "SyntheticGenerator", "Table",
    "iter_batches", "load_movielens", "load_source", "load_tabular", "make_batch", "make_synthetic_splits",
]
