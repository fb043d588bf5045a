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
from c2al.dist.sharding import DENSE_OPTIMIZER_CLASSES, embedding_collections
from c2al.errors import C2ALError
from c2al.train.task import TrainModule, train_epoch

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


class SparseTableOptimizer:
    """sgd / adagrad / rowwise_adagrad on sparse table gradients, with state only for the client's rows.

    rowwise_adagrad keeps one accumulator per row (mean of the squared gradient
    over D), as FBGEMM's EXACT_ROWWISE_ADAGRAD.

    Args:
        params: table weights [N, D] with sparse gradients.
        rows: per table, the sorted ids the client can touch [R] (its state is [R, D] or [R, 1]).
        kind: sgd, adagrad or rowwise_adagrad.
        lr: learning rate.
    """

    def __init__(self, params: list[nn.Parameter], rows: list[np.ndarray], kind: str, lr: float, eps: float = 1e-8) -> None:
        if kind not in ("sgd", "adagrad", "rowwise_adagrad"):
            raise C2ALError(f"federated clients run tables with sgd, adagrad or rowwise_adagrad, not {kind!r}")
        self.params, self.kind, self.lr, self.eps = params, kind, lr, eps
        self.rows = [torch.from_numpy(r) for r in rows]
        self.acc = [torch.zeros(len(r), p.shape[1] if kind == "adagrad" else 1) for p, r in zip(params, rows)]

    def step(self) -> None:
        for p, rows, acc in zip(self.params, self.rows, self.acc):
            if p.grad is None:
                continue
            g = p.grad.coalesce()
            idx, vals = g.indices()[0], g.values()  # [R], [R, D]
            if self.kind == "sgd":
                p.data.index_add_(0, idx, -self.lr * vals)
                continue
            pos = torch.searchsorted(rows, idx)  # [R] positions in the client's rows
            acc[pos] += vals * vals if self.kind == "adagrad" else (vals * vals).mean(1, keepdim=True)
            p.data.index_add_(0, idx, -self.lr * vals / (acc[pos].sqrt() + self.eps))


class LocalOptimizer:
    """The client's optimizer as train_epoch sees it: dense torch optimizer + sparse tables.

    `step` first undoes a SAM perturbation (the gradient was taken at w + e and
    is applied at w), then adds FedProx's proximal gradient mu (w - w_global),
    then steps.
    """

    def __init__(self, dense: torch.optim.Optimizer, tables: SparseTableOptimizer, *,
                 prox: list[tuple[nn.Parameter, torch.Tensor]] = (), mu: float = 0.0, sam: "SAMModule | None" = None) -> None:
        self.dense, self.tables, self.prox, self.mu, self.sam = dense, tables, list(prox), mu, sam

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        for p in self.tables.params:
            p.grad = None

    def step(self) -> None:
        if self.sam is not None:
            self.sam.restore()
        if self.mu > 0:
            for p, ref in self.prox:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:  # lazy: only the rows of this batch feel the proximal pull
                    g = p.grad.coalesce()
                    idx = g.indices()[0]
                    p.grad = torch.sparse_coo_tensor(g.indices(), g.values() + self.mu * (p.data[idx] - ref[idx]), g.shape,
                                                     check_invariants=False)  # the indices are the coalesced gradient's
                else:
                    p.grad = p.grad + self.mu * (p.data - ref)
        self.dense.step()
        self.tables.step()


class SAMModule(nn.Module):
    """Sharpness-aware local steps (FedRecGEL): the loss is taken at w + rho g / |g|.

    Wraps a TrainModule: forward computes g on the batch, perturbs the shared
    parameters, and returns the perturbed forward, whose backward gives SAM's
    gradient; `LocalOptimizer.step` restores w before stepping.
    """

    def __init__(self, inner: TrainModule, params: list[nn.Parameter], rho: float) -> None:
        super().__init__()
        self.inner, self.rho = inner, rho
        self._params = params  # a plain list: not registered twice
        self._eps: list[tuple[nn.Parameter, torch.Tensor]] = []

    def forward(self, batch: Batch) -> Any:
        if not self.training:
            return self.inner(batch)
        loss, _ = self.inner(batch)
        grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        pairs = [(p, g) for p, g in zip(self._params, grads) if g is not None]
        norm = torch.sqrt(sum(((g.coalesce().values() if g.is_sparse else g) ** 2).sum() for _, g in pairs)) + 1e-12
        self._eps = [(p, g * (self.rho / norm)) for p, g in pairs]
        for p, e in self._eps:
            p.data.add_(e)
        return self.inner(batch)

    def restore(self) -> None:
        for p, e in self._eps:
            p.data.sub_(e)
        self._eps = []


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


def client_steps(rows: np.ndarray, batch_size: int, seed: int, max_steps: int, epochs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(row indices [B], weights [B]) of each local step: `epochs` shuffled passes over the client's
    rows (epoch e seeded seed + e, as the centralized loop seeds its epochs), cut as `iter_batches`
    cuts them (the tail padded with weight-0 rows), stopped after `max_steps` (0: no cap)."""
    passes = (batch_rows(np.asarray(rows), batch_size, shuffle=True, seed=seed + e) for e in range(epochs))
    return list(itertools.islice(itertools.chain.from_iterable(passes), max_steps or None))


def local_batches(table: Table, schema: Schema, rows: np.ndarray, batch_size: int, seed: int,
                  max_steps: int, epochs: int) -> Iterator[Batch]:
    """The batches of `client_steps`, collated."""
    return (make_batch(table, schema, r, w) for r, w in client_steps(rows, batch_size, seed, max_steps, epochs))


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


class LocalTrainer:
    """Runs clients one after another on one working copy of the model.

    Args:
        module: TrainModule around the unsharded model (a c2al wrapper inside for C2AL rounds).
        layout: from `model_layout`.
        schema, train: the schema and the split clients train on (clients index its rows).
        dense_optimizer, lr, table_optimizer, table_lr: the local optimizers (as the config's).
        batch_size: local batch size.
        normalized: send `normalized` updates (per local step, weighted by training rows).
    """

    def __init__(self, module: TrainModule, layout: Layout, schema: Schema, train: Table, *, dense_optimizer: str = "adam",
                 lr: float = 3e-3, table_optimizer: str = "rowwise_adagrad", table_lr: float = 0.05, batch_size: int = 32,
                 weight_decay: float = 0.0, normalized: bool = False) -> None:
        self.module, self.layout, self.schema, self.train = module, layout, schema, train
        self.params = dict(module.model.named_parameters()) if hasattr(module, "model") else dict(module.named_parameters())
        missing = [n for n in [*layout.private, *layout.shared] if n not in self.params]
        if missing:
            raise C2ALError(f"federated: the model has no parameters {missing[:3]}")
        use_sparse_gradients(module)
        self.dense_optimizer, self.lr, self.weight_decay = dense_optimizer, lr, weight_decay
        self.table_optimizer, self.table_lr, self.batch_size = table_optimizer, table_lr, batch_size
        self.normalized = normalized
        self._touched: dict[tuple[int, str], np.ndarray] = {}
        self.initial_private: dict[str, np.ndarray] = {}  # seeded private tables, for clients seen first (Flower engine)

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Copy the global shared parameters into the working model (once per round)."""
        with torch.no_grad():
            for name in self.layout.shared:
                self.params[name].copy_(torch.from_numpy(np.asarray(state[name])))

    def touched(self, client: ClientData, feature: str) -> np.ndarray:
        key = (client.cid, feature)
        if key not in self._touched:
            self._touched[key] = np.unique(self.train.sparse[feature].take(client.train).values)
        return self._touched[key]

    def fit(self, client: ClientData, state: dict[str, np.ndarray], private: dict[str, Rows], config: dict[str, Any],
            step_seed: Callable[[int], int] | None = None) -> FitResult:
        """Train one client from the global `state` (already loaded) and its private rows.

        Args:
            client: its rows.
            state: global shared parameters (numpy), as loaded by `load`.
            private: the client's stored private rows per table (absent: the table's initial rows).
            config: from the strategy: seed, epochs, max_steps, proximal_mu, sam_rho.
            step_seed: reseeds torch before each step (dropout), as centralized training does;
                by default from config["step_seed"].

        Returns:
            The FitResult; the working model is restored to `state` afterwards.
        """
        if step_seed is None and "step_seed" in config:
            base = int(config["step_seed"])
            step_seed = lambda n: (base + n * 7919) % (2**63)  # noqa: E731 - centralized training's formula
        p = self.params
        with torch.no_grad():
            for name, (ids, rows) in private.items():
                p[name][torch.from_numpy(ids)] = torch.from_numpy(rows)
        shared_p = [p[n] for n in self.layout.shared]
        module: nn.Module = self.module
        sam = None
        if config.get("sam_rho", 0.0) > 0:
            sam = SAMModule(self.module, shared_p, float(config["sam_rho"]))
            module = sam
        dense = DENSE_OPTIMIZER_CLASSES[self.dense_optimizer]([p[n] for n in self.layout.dense], lr=self.lr, weight_decay=self.weight_decay)
        table_names = {**self.layout.tables, **self.layout.private}
        tables = SparseTableOptimizer([p[n] for n in table_names], [self.touched(client, f) for f in table_names.values()],
                                      self.table_optimizer, self.table_lr)
        prox = [(p[n], torch.from_numpy(np.asarray(state[n]))) for n in self.layout.shared]
        opt = LocalOptimizer(dense, tables, prox=prox, mu=float(config.get("proximal_mu", 0.0)), sam=sam)
        batches = list(local_batches(self.train, self.schema, client.train, self.batch_size, int(config["seed"]),
                                     int(config.get("max_steps", 0)), int(config.get("epochs", 1))))
        stats = train_epoch(module, opt, batches, total=len(batches), show=False, desc=f"client {client.user}", step_seed=step_seed)
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
