"""Data side: schema and tables, batches, the in-memory sources (MovieLens, tabular files, synthetic) and the
streaming ones (Criteo text / NumPy, Parquet and CSV read chunk by chunk)."""
from c2al.data.batch import Batch, iter_batches, make_batch
from c2al.data.movielens import load_movielens
from c2al.data.schema import JaggedColumn, Schema, SparseFeature, Splits, Table
from c2al.data.sources import load_source
from c2al.data.stream import StreamSplits, TableStream, TrainStream, is_stream, iter_stream_batches, open_stream
from c2al.data.synthetic import SyntheticConfig, SyntheticGenerator, make_synthetic_splits
from c2al.data.tabular import load_tabular
from c2al.data.vocab import Vocabulary

__all__ = [
    "Batch", "JaggedColumn", "Schema", "SparseFeature", "Splits", "StreamSplits", "SyntheticConfig", "SyntheticGenerator", "Table",
    "TableStream", "TrainStream", "Vocabulary", "is_stream", "iter_batches", "iter_stream_batches", "load_movielens", "load_source",
    "load_tabular", "make_batch", "make_synthetic_splits", "open_stream",
]
