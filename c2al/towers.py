"""Multi-task towers on the shared representation: shared-bottom and MMoE, attached like C2AL's heads.

The cohort tasks are C2AL's auxiliary labels y_k = y * 1[x in C_k] (or, with
aux_labels="own", y on cohort k's rows only); the main task is the model's own
output head, and it is the main tower that is served.

* shared-bottom: everything up to the submodule `at` is the shared bottom and
  each exposed cohort gets one tower reading its output. That is exactly the
  architecture of `c2al.attach`'s heads, so `attach_towers(kind="shared-bottom")`
  is `c2al.attach` and its served model is the plain model.
* mmoe (Ma et al., KDD 2018): M experts read the shared representation
  [B, H] and each of the T = K + 1 tasks mixes their outputs with its own softmax
  gate; the main task's mixture replaces the representation on the model's own
  path (so the model's output head is the main tower) and cohort k's tower reads
  mixture k + 1. The submodule `at` is swapped for a `MixedArch(arch, mmoe)`
  holding the original module (its attributes stay reachable through it), and
  the C2AL wrapper's heads read the MMoE's [B, T, H] output, one slice per
  tower. `detach_towers` drops the cohort towers and the cohort gates: the served
  model keeps the experts and the main gate, which its main path uses.

Letters: B batch, H representation width, K cohorts, T = K + 1 tasks, M experts.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from c2al import plugin
from c2al.errors import C2ALError
from c2al.plugin import C2ALWrapper, HeadSpec, _build_head

TOWERS = ("shared-bottom", "mmoe")


class MMoE(nn.Module):
    """Multi-gate mixture of experts: M experts shared by T tasks through per-task softmax gates.

    Each expert is Linear(H, h), ReLU, Linear(h, H), so every task's mixture has the
    representation's width and the model's own head can read the main one.

    Args:
        in_features: H.
        n_tasks: T (the main task first).
        n_experts: M.
        hidden: h, the experts' hidden width (default H).
        device: where the parameters are created.

    Example:
        >>> mmoe = MMoE(in_features=6, n_tasks=3, n_experts=4)
        >>> mmoe(torch.randn(5, 6)).shape
        torch.Size([5, 3, 6])
        >>> mmoe.gate_weights(torch.randn(5, 6)).shape
        torch.Size([5, 3, 4])
    """

    def __init__(self, in_features: int, n_tasks: int, n_experts: int = 4, hidden: int | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if min(in_features, n_tasks, n_experts) < 1:
            raise C2ALError(f"MMoE: in_features, n_tasks and n_experts must be >= 1, got {in_features}, {n_tasks}, {n_experts}")
        h = hidden or in_features
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(in_features, h, device=device), nn.ReLU(), nn.Linear(h, in_features, device=device))
            for _ in range(n_experts))
        self.gates = nn.ModuleList(nn.Linear(in_features, n_experts, device=device) for _ in range(n_tasks))
        self.out_features: int = in_features

    def gate_weights(self, rep: torch.Tensor) -> torch.Tensor:
        """[B, T, M] each task's softmax weights over the experts."""
        return torch.stack([torch.softmax(g(rep), dim=-1) for g in self.gates], dim=1)

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        """[B, H] representation -> [B, T, H] one mixture of the experts per task."""
        experts = torch.stack([e(rep) for e in self.experts], dim=1)  # [B, M, H]
        return torch.bmm(self.gate_weights(rep), experts)  # [B, T, M] @ [B, M, H] -> [B, T, H]

    def keep_main(self) -> None:
        """Drop every gate but the main task's (for serving): forward then returns [B, 1, H]."""
        self.gates = nn.ModuleList([self.gates[0]])


class MixedArch(nn.Module):
    """The original `at` module followed by an MMoE; returns the main task's mixture [B, H].

    Attributes the original module offers (AFM's `attention`, `out_features`, ...)
    stay reachable on this one, so code that inspects `model.inter_arch` still works.
    """

    def __init__(self, arch: nn.Module, mmoe: MMoE) -> None:
        super().__init__()
        self.arch = arch
        self.mmoe = mmoe

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        rep = self.arch(*args, **kwargs)  # [B, H]
        return self.mmoe(rep)[:, 0]  # [B, H]: the main task's mixture, what the model's own head reads

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("arch"), name)


class TaskTower(nn.Module):
    """One cohort task's tower: reads its own slice of the flattened [B, T*H] mixtures."""

    def __init__(self, task: int, width: int, tower: nn.Module) -> None:
        super().__init__()
        self.task, self.width = task, width
        self.tower = tower

    def forward(self, mixtures: torch.Tensor) -> torch.Tensor:
        """[B, T*H] -> the tower's [B, 1] on the slice of task `task`."""
        return self.tower(mixtures[:, self.task * self.width:(self.task + 1) * self.width])


def attach_towers(
    model: nn.Module,
    at: str,
    n_cohorts: int,
    aux_weight: float | Sequence[float] = 0.1,
    head: HeadSpec = None,
    *,
    kind: str = "shared-bottom",
    n_experts: int = 4,
    in_features: int | None = None,
    aux_labels: str = "conflicting",
) -> C2ALWrapper:
    """One tower per exposed cohort on the representation at `at`, shared-bottom or through an MMoE.

    Args:
        model: the user's model (c2al's AFM / AttentionFM, ...).
        at: the submodule whose [B, H] output is the shared representation ("inter_arch").
        n_cohorts: K cohort towers.
        aux_weight: the cohort tasks' loss weights lambda (one, or one per cohort).
        head: each cohort tower, as for `c2al.attach` (None: a small MLP; a module: cloned; a callable of H).
        kind: "shared-bottom" or "mmoe".
        n_experts: M (mmoe).
        in_features: H when the `at` module has no int `out_features`.
        aux_labels: "conflicting" (y * 1[cohort == k]) or "own" (see `c2al.attach`).

    Returns:
        A C2ALWrapper (its forward returns AuxOutput, its `loss` the weighted task sum);
        serve `detach_towers(wrapper)`.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
        >>> wrapper = attach_towers(net, "0", n_cohorts=2, kind="mmoe", in_features=6)
        >>> wrapper(torch.randn(3, 4)).aux_logits.shape
        torch.Size([3, 2])
        >>> served = detach_towers(wrapper)
        >>> len(served[0].mmoe.gates)
        1
    """
    if kind not in TOWERS:
        raise C2ALError(f"--aux-towers {kind!r}: expected one of {', '.join(TOWERS)}")
    if kind == "shared-bottom":  # C2AL's heads are shared-bottom towers
        return plugin.attach(model, at, n_cohorts, aux_weight, head, in_features=in_features, aux_labels=aux_labels)
    parent, name, target = _locate(model, at)
    width = _width(target, at, in_features)
    device = next(iter(target.parameters()), torch.zeros(())).device
    mixed = MixedArch(target, MMoE(width, n_cohorts + 1, n_experts, device=device))
    setattr(parent, name, mixed)
    tasks = iter(range(1, n_cohorts + 1))  # the wrapper builds its K heads in order: head k reads task k + 1

    def tower(_: int | None) -> nn.Module:
        return TaskTower(next(tasks), width, _build_head(head, width, device))

    try:
        return plugin.attach(model, f"{at}.mmoe", n_cohorts, aux_weight, tower, in_features=(n_cohorts + 1) * width,
                             aux_labels=aux_labels)
    except BaseException:
        setattr(parent, name, target)  # leave the model as it came
        raise


def detach_towers(wrapper: C2ALWrapper) -> nn.Module:
    """The model to serve: the main tower only (no cohort towers; with MMoE no cohort gates either).

    Args:
        wrapper: what `attach_towers` returned.

    Returns:
        The user's model object: as before attaching for shared-bottom; with its `at`
        submodule a MixedArch holding the experts and the main gate for mmoe.
    """
    mixed_at = wrapper.at.removesuffix(".mmoe") if isinstance(wrapper, C2ALWrapper) else ""
    model = plugin.detach(wrapper)
    mixed = model.get_submodule(mixed_at) if mixed_at != wrapper.at else None
    if isinstance(mixed, MixedArch):
        mixed.mmoe.keep_main()
    return model


def _locate(model: nn.Module, at: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent module, attribute name, the module) of the dotted name `at`."""
    try:
        target = model.get_submodule(at)
    except AttributeError:
        raise C2ALError(f"attach_towers: {type(model).__name__} has no submodule at={at!r}") from None
    if isinstance(target, MixedArch):
        raise C2ALError(f"attach_towers: at={at!r} already carries MMoE towers; detach_towers that wrapper first")
    parent_name, _, name = at.rpartition(".")
    return model.get_submodule(parent_name), name, target


def _width(target: nn.Module, at: str, in_features: int | None) -> int:
    width = in_features if in_features is not None else getattr(target, "out_features", None)
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise C2ALError(f"attach_towers: cannot tell the width of at={at!r} (no int out_features); pass in_features=")
    return width
