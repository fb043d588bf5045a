"""Centralized and federated training of the next-item dual encoder (Ning et al. 2021's protocol).

The loss, the step loop and the federated rounds are the project's own: a `TrainModule`
subclass turns a batch into the chosen loss, `c2al.train.task.train_epoch` steps it, and
`c2al.federated.simulation.run_rounds` runs the rounds with `FedAdam` on the server and
`LocalTrainer`'s SGD on the clients. Two small adapters are needed, both here:

- the item table serves two features (context bag and label), which `model_layout` refuses
  (one feature per table), so the layout is written out (`next_item_layout`);
- a client's update covers the table rows its examples touch, but the whole-catalog losses
  (global softmax, spread-out over the vocabulary) move EVERY row, and the paper's TFF
  clients send the whole model anyway, so `CatalogTrainer` declares all rows touched
  (`FederatedSettings.full_table_updates`): the server's mean and Adam then run over the
  whole table as TFF's dense FedAvg does.

A round's clients train side by side by default (`FederatedSettings.parallel_clients`,
`c2al.federated.vectorized`: one vmapped step for all clients, each with its own copy of
the tower and of its table rows, the whole table for the whole-catalog losses); 0 trains
them one after another through `LocalTrainer.fit`, the reference the vectorized path is
tested against.

Losses (LOSSES): batch_softmax (in-batch negatives: the client's own batch), global_softmax
(every catalog item a negative), hinge_spreadout (squared hinge on the positive, margin 0.9,
plus spread-out over the whole vocabulary) and spreadout (the spread-out terms alone).
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from c2al.data.batch import Batch, iter_batches
from c2al.data.sequences import NextItemSplits
from c2al.errors import C2ALError
from c2al.eval.next_item import next_item_metrics
from c2al.federated.client import ClientData, Layout, LocalTrainer, group_by_user
from c2al.federated.heterogeneity import TierSpec
from c2al.federated.rounds import FedTrained
from c2al.federated.simulation import run_rounds
from c2al.federated.strategy import STRATEGIES, Aggregation, make_strategy
from c2al.losses import in_batch_softmax_loss, positive_hinge_loss, spreadout_terms
from c2al.models.sequence_two_tower import SequenceTwoTower, build_sequence_two_tower
from c2al.train.task import TrainModule, train_epoch

log = logging.getLogger("c2al.next_item")
LOSSES = ("batch_softmax", "global_softmax", "hinge_spreadout", "spreadout")
WHOLE_CATALOG = ("global_softmax", "hinge_spreadout", "spreadout")  # losses whose gradient reaches every item row
CRITERION = "recall@10"


@dataclass(frozen=True)
class NextItemLoss:
    """Which loss and its constants (defaults: Ning et al.'s code).

    Attributes:
        kind: one of LOSSES.
        temperature: softmax logits are cosine / temperature (their code: raw cosine, 1).
        margin: the squared hinge's positive margin.
        lambdas: spread-out scales (context, label, cross).
        table_spreadout: scale of a spread-out term over the whole item table added to ANY loss: their item
            Embedding's `EmbeddingSpreadoutRegularizer` (dual_encoder/movielens/model.py, keras_layers.py),
            which TFF adds to every client's loss; their README's TFF command sets it to 0.001 beside the
            loss lambdas. 0 (the default): the losses as the issue defines them.
    """

    kind: str = "batch_softmax"
    temperature: float = 1.0
    margin: float = 0.9
    lambdas: tuple[float, float, float] = (1e-3, 1e-3, 1e-3)
    table_spreadout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise C2ALError(f"--loss must be one of {list(LOSSES)}, got {self.kind!r}")
        if not self.table_spreadout >= 0:
            raise C2ALError(f"--table-spreadout must be >= 0, got {self.table_spreadout}")

    @property
    def whole_catalog(self) -> bool:
        """Whether the gradient reaches every item row (a client then holds and sends the whole table)."""
        return self.kind in WHOLE_CATALOG or self.table_spreadout > 0


class NextItemTrainModule(TrainModule):
    """Batch -> the chosen next-item loss for a SequenceTwoTower (the model never owns its loss).

    Args:
        model: the SequenceTwoTower.
        loss: the NextItemLoss.
    """

    def __init__(self, model: SequenceTwoTower, loss: NextItemLoss) -> None:
        super().__init__(model, loss="softmax")
        self.spec = loss

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        query, candidate = self.model.towers(batch.dense, batch.sparse)  # [B, H] each, unit rows
        w, kind = batch.weights, self.spec.kind
        catalog = self.model.catalog() if self.spec.whole_catalog else None  # [V, H]
        if kind == "batch_softmax":
            loss = in_batch_softmax_loss(query, candidate, batch.labels, self.spec.temperature, normalize=False, weights=w)
        else:
            if kind == "global_softmax":
                loss = catalog_softmax_loss(query, candidate, catalog, w, self.spec.temperature)
            else:
                loss = spreadout_terms(query, candidate, catalog, w, self.spec.lambdas)
                if kind == "hinge_spreadout":
                    loss = loss + positive_hinge_loss(query, candidate, w, self.spec.margin)
        if self.spec.table_spreadout:  # the label term alone: the whole table's off-diagonal cosine norm
            loss = loss + spreadout_terms(query, candidate, catalog, w, (0.0, self.spec.table_spreadout, 0.0))
        logits = (query * candidate).sum(-1).detach()
        return loss, (loss.detach(), logits, {"main": loss.detach()})


def catalog_softmax_loss(query: torch.Tensor, candidate: torch.Tensor, catalog: torch.Tensor, weights: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """`c2al.losses.global_softmax_loss` with the positive's logit taken from the label tower instead of
    a target index: logsumexp_v(q . e_v / T) - q . c / T (the label tower IS the label's catalog row, so
    the two are equal up to round-off). Vectorized clients see no KeyedJaggedTensor, hence no target ids.

    Args:
        query: [B, H] unit context vectors; candidate: [B, H] unit label vectors.
        catalog: [V, H] unit item vectors.
        weights: [B] in {0, 1}.
        temperature: logits are cosine / temperature.

    Returns:
        Scalar weighted mean over rows; 0 for an all-padding batch.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]]); items = torch.eye(2)
        >>> round(float(catalog_softmax_loss(q, items[:1], items, torch.ones(1))), 4)  # -log(e / (e + 1))
        0.3133
    """
    if temperature <= 0:
        raise C2ALError(f"catalog_softmax_loss: temperature must be > 0, got {temperature}")
    per_row = torch.logsumexp(query @ catalog.T / temperature, dim=-1) - (query * candidate).sum(-1) / temperature  # [B]
    w = weights.to(per_row.dtype)
    total = w.sum()
    return (per_row * w).sum() / torch.where(total > 0, total, torch.ones_like(total))


def _seeded(num_items: int, seed: int, loss: NextItemLoss, embedding_dim: int = 16) -> NextItemTrainModule:
    torch.manual_seed(seed)
    return NextItemTrainModule(build_sequence_two_tower(num_items, embedding_dim, (embedding_dim,)), loss)


def _epochs(splits: NextItemSplits, batch_size: int, seed: int) -> Any:
    """Shuffled training batches, epoch after epoch (epoch e shuffled with seed * 1000 + e)."""
    for e in itertools.count():
        yield from iter_batches(splits.train, splits.schema, batch_size, shuffle=True, seed=seed * 1000 + e, drop_last=True)


def fit_centralized(splits: NextItemSplits, loss: NextItemLoss, seed: int, *, lr: float = 0.01, batch_size: int = 16,
                    eval_every: int = 10_000, patience: int = 3, max_evals: int = 100, embedding_dim: int = 16,
                    show: bool = False, keep_model: bool = False) -> dict[str, Any]:
    """Adam on the pooled training examples (their centralized launcher), early-stopped on validation recall@10.

    Args:
        splits: the next-item splits.
        loss: the loss.
        seed: model init and batch order.
        lr, batch_size: Adam's learning rate and the batch.
        eval_every: steps between validation evaluations (their launcher's "epoch" of steps).
        patience: evaluations without a strictly higher recall@10 before stopping.
        max_evals: the most evaluations (a cap on steps).
        embedding_dim: D of the item table and the context tower (16 in the paper).
        show: a progress bar over each evaluation's steps.
        keep_model: also return the best state's model as "model".

    Returns:
        {"valid": best validation metrics, "test": test metrics of the best state, "steps", "history", "seconds"}
        (and "model" with keep_model).
    """
    module = _seeded(splits.num_items, seed, loss, embedding_dim)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    stream, began = _epochs(splits, batch_size, seed), time.perf_counter()
    best: dict[str, Any] = {}
    history, bad = [], 0
    for i in range(max_evals):
        stats = train_epoch(module, opt, itertools.islice(stream, eval_every), total=eval_every, show=show, desc=f"centralized {loss.kind}")
        valid = next_item_metrics(module.model, splits.valid, splits.schema)
        history.append({"steps": (i + 1) * eval_every, "loss": stats.get("loss"), **{f"valid_{k}": v for k, v in valid.items()}})
        log.info(f"[centralized {loss.kind}] step {(i + 1) * eval_every}  loss {stats.get('loss', float('nan')):.4f}  "
                 f"valid recall@10 {valid[CRITERION]:.4f}")
        if not best or valid[CRITERION] > best["valid"][CRITERION]:
            best, bad = {"valid": valid, "steps": (i + 1) * eval_every, "state": {k: v.clone() for k, v in module.state_dict().items()}}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    module.load_state_dict(best.pop("state"))
    test = next_item_metrics(module.model, splits.test, splits.schema)
    kept = {"model": module.model} if keep_model else {}
    return {**best, "test": test, "history": history, "seconds": time.perf_counter() - began, **kept}


def next_item_layout(model: SequenceTwoTower) -> Layout:
    """The one item table shared (aggregated row by row), the context tower dense; no private rows."""
    table = f"embedding_bag_collection.embedding_bags.{model.table}.weight"
    dense = [n for n, p in model.named_parameters() if p.requires_grad and n != table]
    return Layout(private={}, tables={table: model.table}, dense=dense)


class CatalogTrainer(LocalTrainer):
    """LocalTrainer over the shared item table: a client's rows are the items of its examples
    (context and label), or with `whole_catalog` every row of the table (a loss that reaches the whole
    catalog, or full-table updates as TFF sends; row 0, never an item, included with a zero delta:
    a client then holds the full table, which the vectorized runner hands a whole-catalog loss)."""

    def __init__(self, *args: Any, whole_catalog: bool, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.whole_catalog = whole_catalog

    def touched(self, client: ClientData, feature: str) -> np.ndarray:
        key = (client.cid, feature)
        if key not in self._touched:
            if self.whole_catalog:
                n = self.params[next(iter(self.layout.tables))].shape[0]
                self._touched[key] = np.arange(n, dtype=np.int64)
            else:
                parts = [self.train.sparse[f].take(client.train).values for f in self.train.sparse]
                self._touched[key] = np.unique(np.concatenate(parts))
        return self._touched[key]


@dataclass(frozen=True)
class FederatedSettings:
    """The paper's federated protocol (defaults), one field per knob.

    Attributes:
        clients_per_round: users sampled a round.
        local_batch, local_epochs, client_lr: each client's SGD.
        server_lr, beta1, beta2, tau: the server's Adam (tau: its epsilon; Keras' defaults 0.9, 0.999, 1e-7, their
            optimizer_utils builds tf.keras.optimizers.Adam from them; `aggregate.fedadam_step` is Keras' form:
            epsilon on the uncorrected sqrt(v), step lr sqrt(1 - b2^t) / (1 - b1^t)).
        rounds: most rounds (200: the TFF command of the paper's README; raise it if validation still improves);
            eval_every: rounds between validations; patience: validations without gain.
        parallel_clients: a round's clients trained side by side, in chunks of this many (`c2al.federated.vectorized`);
            0 or 1: one after another (the reference path; rounds under `simulation.MIN_SIDE_BY_SIDE` clients too).
        full_table_updates: every client sends its delta of the WHOLE item table (zero on rows it did not
            touch), as TFF's FedAvg sends the whole model (`tff.learning.build_federated_averaging_process` in
            dual_encoder/movielens/model_launcher_tff.py): the server then averages each row over all the
            round's clients and its Adam steps every row every round (Keras' dense Adam: momentum keeps moving
            a row no client touched this round). False: c2al's row-wise mean over the clients that touched a
            row and lazy Adam (the AFM's federated path). The whole-catalog losses send every row either way.
        drop_last: a client's last partial local batch is dropped, as their client datasets are cut
            (`batch(batch_size, drop_remainder=True)` in movielens_data_gen.create_tf_datasets); False pads it.
        server_optimizer: the server's strategy (`c2al.federated.strategy.STRATEGIES`): fedadam (their
            launcher's), fedadagrad (RF^2's), fedavg, fedyogi or fedprox (with proximal_mu on the clients).
            beta1, beta2 and tau are Adam's and Yogi's; the others keep their strategy's own constants.
    """

    clients_per_round: int = 100
    local_batch: int = 16
    local_epochs: int = 1
    client_lr: float = 0.01
    server_lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    tau: float = 1e-7
    rounds: int = 200
    eval_every: int = 10
    patience: int = 5
    parallel_clients: int = 100
    full_table_updates: bool = True
    drop_last: bool = True
    server_optimizer: str = "fedadam"
    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        if self.server_optimizer not in STRATEGIES:
            raise C2ALError(f"FederatedSettings.server_optimizer must be one of {sorted(STRATEGIES)}, got {self.server_optimizer!r}")
        if not self.server_lr > 0:
            raise C2ALError(f"FederatedSettings.server_lr must be > 0, got {self.server_lr}")
        for name in ("clients_per_round", "local_batch", "local_epochs", "rounds", "eval_every"):
            if getattr(self, name) < 1:
                raise C2ALError(f"FederatedSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.parallel_clients < 0 or self.patience < 0:
            raise C2ALError(f"FederatedSettings: parallel_clients and patience must be >= 0, got "
                            f"{self.parallel_clients}, {self.patience}")


def federated_rounds(splits: NextItemSplits, loss: NextItemLoss, seed: int, fed: FederatedSettings, *,
                     show: bool = False, embedding_dim: int = 16) -> FedTrained:
    """The federated rounds of `fit_federated` (FedAdam over `CatalogTrainer` clients), early-stopped on
    validation recall@10; the FedTrained holds the kept global parameters.

    Args:
        splits, loss, seed, fed, show, embedding_dim: as `fit_federated`.

    Returns:
        The FedTrained of `run_rounds`.
    """
    module = _seeded(splits.num_items, seed, loss, embedding_dim)
    layout = next_item_layout(module.model)
    trainer = CatalogTrainer(module, layout, splits.schema, splits.train, dense_optimizer="sgd", lr=fed.client_lr,
                             table_optimizer="sgd", table_lr=fed.client_lr, batch_size=fed.local_batch,
                             whole_catalog=loss.whole_catalog or fed.full_table_updates, drop_last=fed.drop_last)
    clients = [ClientData(cid=i, user=u, train=rows) for i, (u, rows) in enumerate(group_by_user(splits.train).items())]
    # TFF weighs a client by its examples, uncapped (c2al's default caps a count at 5x the round's median against liars)
    moments = {"beta1": fed.beta1, "beta2": fed.beta2, "tau": fed.tau} if fed.server_optimizer in ("fedadam", "fedyogi") else {}
    strategy = make_strategy(fed.server_optimizer, layout, fed.clients_per_round, epochs=fed.local_epochs, server_lr=fed.server_lr,
                             proximal_mu=fed.proximal_mu, seed=seed, aggregation=Aggregation("mean", count_cap=0.0), **moments)

    def evaluate(trained: Any) -> dict[str, Any]:  # the installed global model (a FedTrained) -> validation metrics
        return next_item_metrics(trained.model, splits.valid, splits.schema)

    return run_rounds(trainer, strategy, clients, np.zeros(len(clients), dtype=np.int64), rounds=fed.rounds, seed=seed,
                      spec=TierSpec.uniform(), evaluate=evaluate, eval_every=fed.eval_every, patience=fed.patience,
                      criterion=CRITERION, show=show, tag=f"federated {loss.kind}", parallel=fed.parallel_clients)


def fit_federated(splits: NextItemSplits, loss: NextItemLoss, seed: int, fed: FederatedSettings = FederatedSettings(),
                  *, show: bool = False, embedding_dim: int = 16, keep_model: bool = False) -> dict[str, Any]:
    """1 client = 1 training user; FedAdam rounds through `run_rounds`, early-stopped on validation recall@10.

    Args:
        splits: the next-item splits (validation and test users never train).
        loss: the loss.
        seed: model init, client sampling and local shuffles.
        fed: the protocol's settings.
        show: a progress bar over rounds.
        embedding_dim: D, as `fit_centralized`.
        keep_model: also return the kept global model as "model".

    Returns:
        {"valid": best validation metrics, "test": test metrics of the kept state, "rounds", "history", "seconds", "settings"}
        (and "model" with keep_model).
    """
    trained = federated_rounds(splits, loss, seed, fed, show=show, embedding_dim=embedding_dim)
    # run_rounds keeps recall@10 only; the kept state's other validation metrics are recomputed here.
    valid = next_item_metrics(trained.model, splits.valid, splits.schema)
    test = next_item_metrics(trained.model, splits.test, splits.schema)
    history = [{k: h[k] for k in ("round", "loss", f"valid_{CRITERION}") if k in h} for h in trained.history]
    return {"valid": valid, "test": test, "rounds": len(trained.history), "kept_round": trained.best.get("rounds"),
            "history": history, "seconds": trained.seconds, "settings": asdict(fed), **({"model": trained.model} if keep_model else {})}
