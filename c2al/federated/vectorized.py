"""A round's clients trained side by side: one vectorized local step for all of them.

The clients of a round train independently from the same global weights, so
their local steps can run together. Each client gets its own copy of the dense
parameters (stacked [C, ...]) and of every table row it can touch (a round
table [sum_c R_c, D] holding each client's rows in its own block). Local step k
of every client that still has a k-th batch is then one lookup, one forward and
one backward instead of C small ones:

- the EBC lookups run outside vmap on the round tables, each client's ids
  remapped into its own block (multi-hot features pool as usual; a table may
  serve several features, e.g. one item table for a context bag and a label);
- the model and its loss (the shared `TrainModule`) run under `torch.func.vmap`
  over the clients, each with its own dense parameters; every EBC is replaced by
  a stand-in that hands back the pooled rows of its client;
- a client whose block holds EVERY row of a table (a loss over the whole
  catalog touches every item row, so each client holds the full table) also
  sees that table whole: the stand-in's `embedding_bags[name].weight` is the
  client's own copy [N, D], looked up outside vmap like the pooled rows, so
  model code that reads a table directly (`SequenceTwoTower.catalog`) works
  unchanged and its gradient reaches only that client's block;
- the table optimizer steps the round tables row by row (rows are per client,
  so the per-row state is each client's own), the dense optimizer steps the
  stacked parameters elementwise for the clients still training. Both, FedProx's
  pull and SAM's move are `c2al.federated.optim`'s, the ones a client trained
  alone uses (there a stack of one client).

Each client takes the batches `LocalTrainer.fit` would cut, the same number of
steps, FedProx's pull and SAM's perturbation (rho g_c / |g_c| with its own
gradient), and returns the same `FitResult`; only the dropout masks
are drawn differently (one draw for all clients of a step). Without dropout the
result equals the one-by-one run up to float rounding (tested).

Letters: C clients side by side (A of them still stepping at a step), B local
batch, R rows a client can touch, D embedding dim.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from c2al.data.batch import Batch, make_batch
from c2al.dist.sharding import embedding_collections
from c2al.errors import C2ALError
from c2al.federated.client import ClientData, FitResult, LocalTrainer, Rows, client_steps, dropout_seeds, normalized
from c2al.federated.optim import DenseOptimizer, LocalOptimizer, Perturbation, SparseTableOptimizer, sam_perturbation
from c2al.train.task import optimizer_step

Job = tuple[int, ClientData, dict[str, Rows], dict[str, Any]]


class _WholeTable:
    """Stands in for one nn.EmbeddingBag under vmap, for code that reads its weight directly."""

    sparse = False  # under vmap the lookup is dense; the gradient reaches the round table sparsely, outside

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows: torch.Tensor | None = None  # the client's whole table [N, D], set before each call

    @property
    def weight(self) -> torch.Tensor:
        if self.rows is None:
            raise C2ALError(f"vectorized clients: the model reads table {self.name!r} whole, but a client holds only "
                            "the rows its examples touch; declare every row touched (as next_item.CatalogTrainer does "
                            "for whole-catalog losses) or train the clients one by one (parallel 0)")
        return self.rows


class _Pooled(nn.Module):
    """Stands in for an EmbeddingBagCollection under vmap: returns its client's pooled rows, and its
    whole tables through `embedding_bags` when the client holds every row."""

    def __init__(self, keys: list[str], dims: list[int], tables: list[str]) -> None:
        super().__init__()
        self.keys, self.dims = keys, dims
        self.values: torch.Tensor | None = None  # [B, sum D], set before each call
        self.embedding_bags = {name: _WholeTable(name) for name in tables}  # a plain dict: no submodules

    def forward(self, features: Any) -> KeyedTensor:
        return KeyedTensor(keys=self.keys, length_per_key=self.dims, values=self.values)


@dataclass
class _Table:
    """One embedding table of the model, as the runner looks it up."""

    param: str  # parameter name in LocalTrainer.params
    name: str  # the table's name in its EBC
    features: list[str]  # every feature the table serves, in the EBC's output order
    bag: nn.EmbeddingBag  # the model's own module: pooling mode, padding


@dataclass
class _RoundTable:
    """Every client's rows of one table, client after client."""

    weight: torch.Tensor  # [sum_c R_c, D], a leaf with sparse gradients
    keys: np.ndarray  # [sum_c R_c] sorted: client position * n_rows + row id
    start: np.ndarray  # [C + 1] where each client's block begins
    ids: list[np.ndarray]  # per client, its row ids [R_c]
    whole: bool  # every client's block holds every row of the table, in order (R_c = N)


class VectorizedRunner:
    """Fits a round's clients side by side on `trainer`'s model (see the module docstring).

    Args:
        trainer: the clients' runtime; its optimizers, batch size and layout are used.

    Example:
        >>> runner = VectorizedRunner(trainer)  # doctest: +SKIP
        >>> results = runner.fit(jobs, params)  # doctest: +SKIP
    """

    def __init__(self, trainer: LocalTrainer) -> None:
        self.trainer = trainer
        self.model = trainer.module.model if hasattr(trainer.module, "model") else trainer.module
        self.prefix = "model." if hasattr(trainer.module, "model") else ""
        self.ebcs: list[tuple[str, nn.Module, list[_Table]]] = []
        for path, ebc in embedding_collections(self.model):
            tables = []
            for cfg in ebc.embedding_bag_configs():
                name = f"{path}.embedding_bags.{cfg.name}.weight" if path else f"embedding_bags.{cfg.name}.weight"
                tables.append(_Table(name, cfg.name, list(cfg.feature_names), ebc.embedding_bags[cfg.name]))
            self.ebcs.append((path, ebc, tables))
        self.stand_ins = [_Pooled([f for t in tables for f in t.features],
                                  [int(t.bag.weight.shape[1]) for t in tables for _ in t.features], [t.name for t in tables])
                          for _, _, tables in self.ebcs]

    @staticmethod
    def supports(trainer: LocalTrainer) -> str | None:
        """Why this model cannot run vectorized (the caller falls back to one client at a time), or None."""
        model = trainer.module.model if hasattr(trainer.module, "model") else trainer.module
        ebcs = list(embedding_collections(model))
        if not ebcs:
            return "the model has no EmbeddingBagCollection"
        if any(not path or ebc.is_weighted() for path, ebc in ebcs):
            return "a weighted or top-level EmbeddingBagCollection"
        return None

    def fit(self, jobs: list[Job], params: dict[str, np.ndarray]) -> list[tuple[int, FitResult | str]]:
        """Train every job's client from the global `params`; results (or failure reasons) in job order."""
        t = self.trainer
        plans = [client_steps(c.train, t.batch_size, int(conf["seed"]), int(conf.get("max_steps", 0)), int(conf.get("epochs", 1)),
                              t.drop_last) for _, c, _, conf in jobs]
        order = sorted(range(len(jobs)), key=lambda i: -len(plans[i]))  # longest first: the stepping clients are a prefix
        jobs, plans = [jobs[i] for i in order], [plans[i] for i in order]
        dense = {n: torch.from_numpy(np.asarray(params[n])).expand(len(jobs), *params[n].shape).clone().requires_grad_()
                 for n in t.layout.dense}
        tables = {tab.param: self._round_table(tab, jobs, params) for _, _, tabs in self.ebcs for tab in tabs}
        opt = self._optimizer(dense, tables, params, float(jobs[0][3].get("proximal_mu", 0.0)))
        sums, failed = self._train(jobs, plans, dense, tables, opt)
        out = [self._collect(i, job, plans[i], dense, tables, params, sums[i], failed.get(i)) for i, job in enumerate(jobs)]
        back = np.argsort(order)
        return [out[i] for i in back]

    # ------------------------------------------------------------------ set-up
    def _round_table(self, tab: _Table, jobs: list[Job], params: dict[str, np.ndarray]) -> _RoundTable:
        t = self.trainer
        if tab.param in t.layout.private:  # the client's own stored rows (ids sorted, as `touched` gives them)
            ids = [np.asarray(private[tab.param][0]) for _, _, private, _ in jobs]
            rows = [private[tab.param][1] for _, _, private, _ in jobs]
        else:  # the rows the client sends back, as `LocalTrainer._collect` takes them
            feature = t.layout.tables.get(tab.param, tab.features[0])
            ids = [t.touched(client, feature) for _, client, _, _ in jobs]
            rows = [np.asarray(params[tab.param])[i] for i in ids]
        n_rows = int(tab.bag.weight.shape[0])
        keys = np.concatenate([c * n_rows + i for c, i in enumerate(ids)]).astype(np.int64)
        start = np.concatenate([[0], np.cumsum([len(i) for i in ids])])
        weight = torch.from_numpy(np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)).requires_grad_()
        whole = all(len(i) == n_rows for i in ids)  # sorted unique ids in [0, N): then exactly 0..N-1
        return _RoundTable(weight=weight, keys=keys, start=start, ids=ids, whole=whole)

    def _optimizer(self, dense: dict[str, torch.Tensor], tables: dict[str, _RoundTable], params: dict[str, np.ndarray],
                   mu: float) -> LocalOptimizer:
        t = self.trainer
        stacked = DenseOptimizer(list(dense.values()), t.dense_optimizer, t.lr, t.weight_decay, stacked=True)
        rows = SparseTableOptimizer([r.weight for r in tables.values()], [np.arange(len(r.keys)) for r in tables.values()],
                                    t.table_optimizer, t.table_lr)
        prox: list[tuple[torch.Tensor, torch.Tensor]] = []
        if mu > 0:  # FedProx pulls toward the weights the round started from
            prox = [(w, w.detach().clone()) for w in dense.values()]
            prox += [(r.weight, r.weight.detach().clone()) for n, r in tables.items() if n in t.layout.shared]
        return LocalOptimizer(stacked, rows, prox=prox, mu=mu)

    # ------------------------------------------------------------------ steps
    def _train(self, jobs: list[Job], plans: list[list[tuple[np.ndarray, np.ndarray]]], dense: dict[str, torch.Tensor],
               tables: dict[str, _RoundTable], opt: LocalOptimizer) -> tuple[list[dict[str, float]], dict[int, str]]:
        t = self.trainer
        sums: list[dict[str, float]] = [{} for _ in jobs]
        failed: dict[int, str] = {}
        seed_of_step = dropout_seeds(jobs[0][3] if jobs and "dropout_stream" in jobs[0][3] else {"dropout_stream": 0})
        rho = float(jobs[0][3].get("sam_rho", 0.0)) if jobs else 0.0
        t.module.train()
        with self._vectorizable():
            for k in range(len(plans[0]) if plans else 0):
                a = sum(len(p) > k for p in plans)
                take = np.concatenate([plans[c][k][0] for c in range(a)])
                weights = np.concatenate([plans[c][k][1] for c in range(a)])
                batch = make_batch(t.train, t.schema, take, weights)
                torch.default_generator.manual_seed(seed_of_step(k))  # dropout: the step's one draw (the first client's stream)
                opt.dense.active = a
                # the one step (task.optimizer_step): client c's loss reaches only client c's parameters and rows;
                # SAM: the gradient is taken at w + rho g / |g|, each client with its own g
                perturb = (lambda losses: self._perturb(losses, dense, tables, a, rho)) if rho > 0 else None
                losses, parts = optimizer_step(lambda: self._losses(batch, dense, tables, a), opt, perturb)
                for c in torch.nonzero(~torch.isfinite(losses)).flatten().tolist():
                    failed.setdefault(c, f"raised C2ALError: client {jobs[c][1].user}: loss became {losses[c].item()} "
                                         f"at step {k}; lower --lr / --table-lr")
                self._add(sums, a, {"loss": losses.detach(), **parts})
        return sums, failed

    def _losses(self, batch: Batch, dense: dict[str, torch.Tensor], tables: dict[str, _RoundTable], a: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every stepping client's loss on its batch [A] (and its named parts [A])."""
        B = self.trainer.batch_size
        pooled, whole = self._lookup(batch, tables, a), self._whole_tables(tables, a)
        fn = torch.func.vmap(self._client_loss, randomness="different")
        return fn({n: w[:a] for n, w in dense.items()}, pooled, whole, batch.dense.view(a, B, -1),
                  *(x.view(a, B) for x in (batch.labels, batch.user_ids, batch.cohort_ids, batch.weights)))

    def _whole_tables(self, tables: dict[str, _RoundTable], a: int) -> list[dict[str, torch.Tensor]]:
        """Per EBC, table name -> every stepping client's whole table [A, N, D], for the tables whose
        clients hold every row (a sparse lookup of the blocks, so the gradient stays row-wise)."""
        out = []
        for _, _, tabs in self.ebcs:
            whole = {}
            for tab in tabs:
                table = tables[tab.param]
                if table.whole:
                    n_rows = int(tab.bag.weight.shape[0])
                    rows = F.embedding(torch.arange(a * n_rows), table.weight, sparse=True)  # [A N, D]
                    whole[tab.name] = rows.view(a, n_rows, -1)
            out.append(whole)
        return out

    @torch.no_grad()
    def _perturb(self, losses: torch.Tensor, dense: dict[str, torch.Tensor], tables: dict[str, _RoundTable], a: int,
                 rho: float) -> Perturbation:
        """Move each client's shared parameters by rho g_c / |g_c| (as `SAMModule`, per client)."""
        layout = self.trainer.layout
        shared = [dense[n] for n in layout.dense] + [tables[n].weight for n in layout.tables]
        finite = torch.isfinite(losses)
        with torch.enable_grad():
            grads = torch.autograd.grad(losses[finite].sum(), shared, allow_unused=True) if bool(finite.any()) else [None] * len(shared)
        clients = len(tables[next(iter(tables))].start) - 1
        rows = []
        for n, g in zip(layout.tables, grads[len(layout.dense):]):
            if g is not None:
                g = g.coalesce()
                idx = g.indices()[0]  # [R]
                owner = torch.from_numpy(np.searchsorted(tables[n].start, idx.numpy(), side="right") - 1)  # [R] client of each row
                rows.append((tables[n].weight, idx, g.values(), owner))
        return sam_perturbation([(dense[n], g) for n, g in zip(layout.dense, grads)], rows, clients, rho)  # applies it

    def _client_loss(self, dense: dict[str, torch.Tensor], pooled: list[torch.Tensor], whole: list[dict[str, torch.Tensor]],
                     *tensors: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One client's loss on its batch (called under vmap: every tensor is that client's slice)."""
        for stand_in, values, tabs in zip(self.stand_ins, pooled, whole):
            stand_in.values = values
            for name, bag in stand_in.embedding_bags.items():
                bag.rows = tabs.get(name)
        x, labels, users, cohorts, weights = tensors
        batch = Batch(sparse=None, dense=x, labels=labels, user_ids=users, cohort_ids=cohorts, weights=weights)
        named = {self.prefix + n: w for n, w in dense.items()}
        loss, out = torch.func.functional_call(self.trainer.module, named, (batch,), strict=False)
        return loss, out[2]  # StepOutput.parts, by position: a train module may return a plain (loss, logits, parts) tuple

    def _lookup(self, batch: Batch, tables: dict[str, _RoundTable], a: int) -> list[torch.Tensor]:
        """Per EBC, the pooled rows of every stepping client [A, B, sum D], each from its own block."""
        features = batch.sparse.to_dict()
        rows_per_client = len(batch) // a
        out = []
        for _, _, tabs in self.ebcs:
            pooled = []
            for tab in tabs:
                table = tables[tab.param]
                for feature in tab.features:
                    jt = features[feature]
                    lengths = jt.lengths().long()
                    client = torch.arange(a).repeat_interleave(rows_per_client).repeat_interleave(lengths)
                    keys = client.numpy() * int(tab.bag.weight.shape[0]) + jt.values().numpy()
                    found = np.minimum(np.searchsorted(table.keys, keys), len(table.keys) - 1)
                    if not np.array_equal(table.keys[found], keys):  # a client would read another row: refuse, never guess
                        raise C2ALError(f"vectorized clients: feature {feature!r} reads rows of table {tab.name!r} outside "
                                        "the rows its client sends back (`touched` must cover every feature the table serves)")
                    pooled.append(F.embedding_bag(torch.from_numpy(found), table.weight, jt.offsets().long(), mode=tab.bag.mode,
                                                  sparse=True, include_last_offset=True, padding_idx=tab.bag.padding_idx).float())
            out.append(torch.cat(pooled, dim=1).view(a, rows_per_client, -1))
        return out

    @contextmanager
    def _vectorizable(self) -> Iterator[None]:
        """EBCs replaced by stand-ins; modules with a fused kernel (a `lean` flag: AFM's hand-written
        backward, which vmap cannot batch) on their autograd reference path, which gives the same numbers."""
        swapped, lean = [], []
        for (path, ebc, _), stand_in in zip(self.ebcs, self.stand_ins):
            parent, _, attr = path.rpartition(".")
            owner = self.model.get_submodule(parent) if parent else self.model
            setattr(owner, attr, stand_in)
            swapped.append((owner, attr, ebc))
        for m in self.model.modules():
            if isinstance(getattr(m, "lean", None), bool) and m.lean:
                m.lean = False
                lean.append(m)
        try:
            yield
        finally:
            for owner, attr, ebc in swapped:
                setattr(owner, attr, ebc)
            for m in lean:
                m.lean = True
            for s in self.stand_ins:
                s.values = None
                for bag in s.embedding_bags.values():
                    bag.rows = None

    @staticmethod
    def _add(sums: list[dict[str, float]], a: int, parts: dict[str, torch.Tensor]) -> None:
        """Running sums of each client's per-step loss parts (train_epoch reports their means)."""
        values = {k: v.detach().reshape(a, -1)[:, 0].tolist() for k, v in parts.items()}
        for c in range(a):
            for k, v in values.items():
                sums[c][k] = sums[c].get(k, 0.0) + v[c]

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def _collect(self, c: int, job: Job, plan: list[tuple[np.ndarray, np.ndarray]], dense: dict[str, torch.Tensor],
                 tables: dict[str, _RoundTable], params: dict[str, np.ndarray], sums: dict[str, float],
                 failure: str | None) -> tuple[int, FitResult | str]:
        cid, layout = job[0], self.trainer.layout
        if failure is not None:
            return cid, failure
        rows_of = {n: (r.ids[c], r.weight.detach()[int(r.start[c]):int(r.start[c + 1])].numpy()) for n, r in tables.items()}
        deltas = {n: (rows_of[n][0], rows_of[n][1] - np.asarray(params[n])[rows_of[n][0]]) for n in layout.tables}
        private = {n: (rows_of[n][0], rows_of[n][1].copy()) for n in layout.private}
        steps = max(len(plan), 1)
        res = FitResult(num_examples=int(sum(float(w.sum()) for _, w in plan)),
                        dense={n: dense[n].detach()[c].numpy() - params[n] for n in layout.dense}, rows=deltas,
                        private=private, metrics={k: v / steps for k, v in sums.items()})
        return cid, normalized(res, len(plan), len(job[1].train)) if self.trainer.normalized else res
