"""The client side: one user's local training on the UNSHARDED model, through the shared task.

A client holds its own rows and its own (private) embedding rows. `LocalTrainer`
keeps ONE working copy of the model for every client of a process: before a
client it writes the client's private rows in, after it reads back only the
rows the client touched, and restores those rows and the dense parameters to
the global values for the next client. Nothing table-sized is copied per client.

The loss, the forward and the step loop are `c2al.train.task.TrainModule` and
`c2al.train.task.train_epoch`, as in centralized training. Embedding tables run with
sparse gradients and a sparse table optimizer (sgd, adagrad, rowwise_adagrad,
stepping only the rows of the batch, as TorchRec's fused optimizers do), the
dense parameters with a torch optimizer; optimizer state is fresh every round.

Letters: B batch, R touched rows, D embedding dim.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from c2al.data.batch import Batch, batch_rows, make_batch
from c2al.data.schema import Schema, Table
from c2al.dist.sharding import embedding_collections
from c2al.errors import C2ALError
from c2al.federated.optim import DenseOptimizer, LocalOptimizer, SAMModule, SparseTableOptimizer
from c2al.train.task import TrainModule, step_seed, train_epoch

Rows = tuple[np.ndarray, np.ndarray]  # (row ids [R], values [R, D])
SEED_STRIDE = 1_000_000_007  # separates the random streams of (round, client) pairs


@dataclass
class Layout:
    """Where each parameter of a model goes in federated training.

    Attributes:
        private: table parameter -> feature, tables whose row is one user's own (user_id):
            they stay on the client and are never aggregated.
        tables: shared table parameter -> feature (item tables, shared user-side tables).
        dense: every other trainable parameter (attention, MLPs, heads), aggregated whole.
    """

    private: dict[str, str]
    tables: dict[str, str]
    dense: list[str]

    @property
    def shared(self) -> list[str]:
        return list(self.tables) + self.dense


def per_user_features(table: Table, schema: Schema) -> list[str]:
    """User-side features whose id names exactly one user (and each user one id): user_id-like.

    A user-side feature shared by many users (gender, region) is a shared
    table; only a one-to-one id is the user's private row.
    """
    out = []
    users = table.user_ids
    for f in schema.sparse:
        if f.side != "user" or f.multi_hot:
            continue
        ids = table.sparse[f.name].first()
        pairs = np.unique(np.stack([users, ids]), axis=1)
        if len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1])):
            out.append(f.name)
    return out


def model_layout(model: nn.Module, private_features: list[str]) -> Layout:
    """Split a model's parameters into private tables, shared tables and dense parameters."""
    private, tables = {}, {}
    for path, ebc in embedding_collections(model):
        for cfg in ebc.embedding_bag_configs():
            if len(cfg.feature_names) != 1:
                raise C2ALError(f"federated: table {cfg.name!r} serves {cfg.feature_names}; one feature per table expected")
            name = f"{path}.embedding_bags.{cfg.name}.weight" if path else f"embedding_bags.{cfg.name}.weight"
            feature = cfg.feature_names[0]
            (private if feature in private_features else tables)[name] = feature
    dense = [n for n, p in model.named_parameters() if p.requires_grad and n not in private and n not in tables]
    return Layout(private=private, tables=tables, dense=dense)


def use_sparse_gradients(model: nn.Module) -> None:
    """Unsharded TorchRec tables are nn.EmbeddingBags: let them emit sparse [R, D] gradients."""
    for _, ebc in embedding_collections(model):
        for bag in ebc.embedding_bags.values():
            bag.sparse = True


@dataclass
class ClientData:
    """What one client holds: its rows of each split (indices into the split tables)."""

    cid: int
    user: int
    train: np.ndarray
    valid: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def group_by_user(table: Table) -> dict[int, np.ndarray]:
    """Row indices of each user, ascending (one client holding all rows gets 0..N-1)."""
    order = np.argsort(table.user_ids, kind="stable")
    users, starts = np.unique(table.user_ids[order], return_index=True)
    return {int(u): rows for u, rows in zip(users, np.split(order, starts[1:]))}


def client_steps(rows: np.ndarray, batch_size: int, seed: int, max_steps: int, epochs: int,
                 drop_last: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """(row indices [B], weights [B]) of each local step: `epochs` shuffled passes over the client's
    rows (epoch e seeded seed + e, as the centralized loop seeds its epochs), cut as `iter_batches`
    cuts them (the tail padded with weight-0 rows, or dropped with `drop_last`), stopped after
    `max_steps` (0: no cap)."""
    passes = (batch_rows(np.asarray(rows), batch_size, shuffle=True, seed=seed + e, drop_last=drop_last) for e in range(epochs))
    return list(itertools.islice(itertools.chain.from_iterable(passes), max_steps or None))


def local_batches(table: Table, schema: Schema, rows: np.ndarray, batch_size: int, seed: int,
                  max_steps: int, epochs: int, drop_last: bool = False) -> Iterator[Batch]:
    """The batches of `client_steps`, collated."""
    return (make_batch(table, schema, r, w) for r, w in client_steps(rows, batch_size, seed, max_steps, epochs, drop_last))


@dataclass
class FitResult:
    """What a client sends back (dense and row deltas) and what it keeps (private rows)."""

    num_examples: int
    dense: dict[str, np.ndarray]
    rows: dict[str, Rows]
    private: dict[str, Rows]
    metrics: dict[str, float]


def normalized(res: FitResult, steps: int, train_rows: int) -> FitResult:
    """FedNova's normalized update (Wang et al. 2020): the shared deltas divided by the local steps taken,
    weighted by the client's training rows (McMahan's n_k) instead of the examples it processed.

    Under FedAvg's weighting a client whose device affords 10 steps sends a ~5x larger update, and 5x
    the examples, of one that affords 2: the global model drifts toward the users of fast devices
    (objective inconsistency). Per-step updates weighted by data size remove that; the server's
    learning rate sets the step (FedAdam normalizes it anyway). Private rows are untouched.

    Example:
        >>> r = normalized(FitResult(64, {"w": np.array([4.0])}, {}, {}, {}), steps=2, train_rows=85)
        >>> r.num_examples, r.dense["w"].tolist()
        (85, [2.0])
    """
    k = max(int(steps), 1)
    return FitResult(num_examples=int(train_rows), dense={n: d / k for n, d in res.dense.items()},
                     rows={n: (i, r / k) for n, (i, r) in res.rows.items()}, private=res.private, metrics=res.metrics)


def dropout_seeds(config: dict[str, Any]) -> Callable[[int], int]:
    """Local step -> torch seed for a client's config: `task.step_seed` on the (round, client) pair's stream.

    Example:
        >>> dropout_seeds({"dropout_seed": 1, "dropout_stream": 0})(2)  # round 1's client 0: centralized step 2's seed
        1015841
    """
    seed, stream = int(config.get("dropout_seed", 0)), int(config["dropout_stream"])
    return lambda n: step_seed(seed, n, stream)


class LocalTrainer:
    """Runs clients one after another on one working copy of the model.

    Args:
        module: TrainModule around the unsharded model (a c2al wrapper inside for C2AL rounds).
        layout: from `model_layout`.
        schema, train: the schema and the split clients train on (clients index its rows).
        dense_optimizer, lr, table_optimizer, table_lr: the local optimizers (as the config's).
        batch_size: local batch size.
        normalized: send `normalized` updates (per local step, weighted by training rows).
        drop_last: drop a client's last partial batch instead of padding it (TFF's `batch(drop_remainder=True)`).
    """

    def __init__(self, module: TrainModule, layout: Layout, schema: Schema, train: Table, *, dense_optimizer: str = "adam",
                 lr: float = 3e-3, table_optimizer: str = "rowwise_adagrad", table_lr: float = 0.05, batch_size: int = 32,
                 weight_decay: float = 0.0, normalized: bool = False, drop_last: bool = False) -> None:
        self.module, self.layout, self.schema, self.train = module, layout, schema, train
        self.params = dict(module.model.named_parameters()) if hasattr(module, "model") else dict(module.named_parameters())
        missing = [n for n in [*layout.private, *layout.shared] if n not in self.params]
        if missing:
            raise C2ALError(f"federated: the model has no parameters {missing[:3]}")
        use_sparse_gradients(module)
        self.dense_optimizer, self.lr, self.weight_decay = dense_optimizer, lr, weight_decay
        self.table_optimizer, self.table_lr, self.batch_size = table_optimizer, table_lr, batch_size
        self.normalized, self.drop_last = normalized, drop_last
        self._touched: dict[tuple[int, str], np.ndarray] = {}
        self.writes = 0  # bumped whenever the working model's parameters change (FedTrained caches by it)
        self.initial_private: dict[str, np.ndarray] = {}  # seeded private tables, for clients seen first (Flower engine)

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Copy the global shared parameters into the working model (once per round)."""
        self.writes += 1
        with torch.no_grad():
            for name in self.layout.shared:
                self.params[name].copy_(torch.from_numpy(np.asarray(state[name])))

    def write_private(self, private: dict[str, Rows]) -> None:
        """Write a client's private rows (table -> (ids, rows)) into the working model."""
        self.writes += 1
        with torch.no_grad():
            for name, (ids, rows) in private.items():
                self.params[name][torch.from_numpy(np.asarray(ids))] = torch.from_numpy(np.asarray(rows))

    def touched(self, client: ClientData, feature: str) -> np.ndarray:
        key = (client.cid, feature)
        if key not in self._touched:
            self._touched[key] = np.unique(self.train.sparse[feature].take(client.train).values)
        return self._touched[key]

    def fit(self, client: ClientData, state: dict[str, np.ndarray], private: dict[str, Rows], config: dict[str, Any],
            seed_of_step: Callable[[int], int] | None = None) -> FitResult:
        """Train one client from the global `state` (already loaded) and its private rows.

        Args:
            client: its rows.
            state: global shared parameters (numpy), as loaded by `load`.
            private: the client's stored private rows per table (absent: the table's initial rows).
            config: from the round: seed, epochs, max_steps, proximal_mu, sam_rho, dropout_seed, dropout_stream.
            seed_of_step: reseeds torch before each step (dropout), as centralized training does;
                by default `task.step_seed(config["dropout_seed"], step, config["dropout_stream"])`.

        Returns:
            The FitResult; the working model is restored to `state` afterwards.
        """
        if seed_of_step is None and "dropout_stream" in config:
            seed_of_step = dropout_seeds(config)
        p = self.params
        self.write_private(private)
        shared_p = [p[n] for n in self.layout.shared]
        module: nn.Module = self.module
        sam = None
        if config.get("sam_rho", 0.0) > 0:
            sam = SAMModule(self.module, shared_p, float(config["sam_rho"]))
            module = sam
        dense = DenseOptimizer([p[n] for n in self.layout.dense], self.dense_optimizer, self.lr, self.weight_decay)
        table_names = {**self.layout.tables, **self.layout.private}
        tables = SparseTableOptimizer([p[n] for n in table_names], [self.touched(client, f) for f in table_names.values()],
                                      self.table_optimizer, self.table_lr)
        prox = [(p[n], torch.from_numpy(np.asarray(state[n]))) for n in self.layout.shared]
        opt = LocalOptimizer(dense, tables, prox=prox, mu=float(config.get("proximal_mu", 0.0)), sam=sam)
        batches = list(local_batches(self.train, self.schema, client.train, self.batch_size, int(config["seed"]),
                                     int(config.get("max_steps", 0)), int(config.get("epochs", 1)), self.drop_last))
        stats = train_epoch(module, opt, batches, total=len(batches), show=False, desc=f"client {client.user}", step_seed=seed_of_step)
        res = self._collect(client, state, num_examples=int(sum(float(b.weights.sum()) for b in batches)), metrics=stats)
        return normalized(res, len(batches), len(client.train)) if self.normalized else res

    @torch.no_grad()
    def _collect(self, client: ClientData, state: dict[str, np.ndarray], num_examples: int, metrics: dict[str, float]) -> FitResult:
        p = self.params
        dense, rows, private = {}, {}, {}
        for n in self.layout.dense:
            dense[n] = p[n].detach().numpy() - state[n]
            p[n].copy_(torch.from_numpy(np.asarray(state[n])))
        for n, feature in self.layout.tables.items():
            ids = self.touched(client, feature)
            new = p[n][torch.from_numpy(ids)].numpy()
            rows[n] = (ids, new - state[n][ids])
            p[n][torch.from_numpy(ids)] = torch.from_numpy(np.ascontiguousarray(state[n][ids]))
        for n, feature in self.layout.private.items():
            ids = self.touched(client, feature)
            private[n] = (ids, p[n][torch.from_numpy(ids)].numpy().copy())
        return FitResult(num_examples=num_examples, dense=dense, rows=rows, private=private, metrics=metrics)
