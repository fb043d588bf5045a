"""The C2AL plugin: cohort auxiliary heads on any model, attached without editing it.

`attach(model, at="inter_arch", n_cohorts=K)` returns a wrapper whose forward
calls the user's model unchanged and, in the same call, reads the output of the
submodule named `at` (the shared representation). K auxiliary heads turn that
representation into K cohort logits. `wrapper.loss` is the C2AL objective
BCE(p, y) + sum_k lambda_k BCE(p_k, y * 1[cohort == k]); `detach(wrapper)`
hands back the untouched model, so serving costs exactly what the base model
costs.

How the representation is read. While attached, the `at` submodule's
*instance* attribute `forward` is a bound method of a small `_Tap` that calls
the class's forward and, only while the wrapper's forward is running, records
the result. Nothing is subclassed; the model object, its parameters and its
state_dict keys are the user's own. This survives the two things TorchRec does
to a model:

* DistributedModelParallel replaces the EmbeddingBagCollection objects it
  shards, but not the dense submodules, so a tap on `inter_arch` stays in
  place. (A tap on the EBC itself would be lost; `at` may not name one.)
* TrainPipelineSparseDist FX-traces the model. TorchRec's tracer keeps every
  ShardedModule-free child of a module holding a ShardedModule as a leaf, and
  torch.fx keeps torch.nn built-ins as leaves; a leaf is recorded as one graph
  node and its Python forward never runs, so the tap would not see it. While
  attached, `at` and every module between the model and `at` therefore carry
  `_is_pytorch_fx_traceable = True` (TorchRec's opt-out of its leaf list) and,
  for torch.nn built-ins, an instance `__module__` outside `torch.nn` (torch.fx's
  leaf test). The tracer then traces through them, the tap runs on FX proxies,
  and the heads' dataflow from the representation lands in the traced graph
  (also when `apply_jit=True` replaces the forward by that graph). Those
  modules must therefore be FX-traceable, as TorchRec's own arches are.

Representation width (to size heads built by c2al), first that applies:
`in_features=`; an int `out_features` attribute of the `at` module (c2al's
arches, nn.Linear, c2al's MLP); TorchRec's DLRM / DLRM_DCN / DeepFM interaction
arches and MLP-like stacks, computed from their configs. All of these need no
forward, so they work when the tables are on the meta device and the model is
sharded later. Otherwise the default head starts with `nn.LazyLinear`, which
needs one forward before DistributedModelParallel (DDP refuses uninitialized
parameters); with meta parameters that is impossible, so attach raises and asks
for `in_features=`. A head given as a module is cloned and needs no width.

Letters: B batch, H representation width, K cohorts.
"""
from __future__ import annotations

import copy
import difflib
import itertools
import math
import numbers
import sys
from typing import Any, Callable, NamedTuple, Sequence, Union

import torch
from torch import nn

from c2al import balance as balance_mod
from c2al.errors import C2ALError
from c2al.losses import bce_with_logits

HeadSpec = Union[None, nn.Module, Callable[[int], nn.Module]]

_TORCHREC_LEAF_OPT_OUT = "_is_pytorch_fx_traceable"
AUX_LABEL_MODES = ("conflicting", "own")
_LAZY_HIDDEN = 32


class AuxOutput(NamedTuple):
    """What a C2AL wrapper's forward returns.

    Attributes:
        logits: exactly what the wrapped model returns ([B] or [B, 1]).
        aux_logits: [B, K], one logit per exposed cohort.
    """

    logits: torch.Tensor
    aux_logits: torch.Tensor


class _Tap:
    """Stands in for one submodule's `forward`; records its output while armed."""

    def __init__(self, module: nn.Module, name: str, previous: Callable[..., Any] | None) -> None:
        self.module = module
        self.name = name
        self.previous = previous  # an instance-level forward someone set before us, kept and restored
        self.armed = False
        self.values: list[Any] = []
        self.split: Callable[[Any], tuple[Any, ...]] | None = None  # set for a balance mode other than "none"
        self.n_copies = 0  # what split returns: the main copy and one per head

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.previous is not None:
            out = self.previous(*args, **kwargs)
        else:
            out = type(self.module).forward(self.module, *args, **kwargs)
        if self.armed:
            if self.split is not None:  # the model goes on with the main copy, the heads read theirs
                copies = self.split(out)  # indexed, not unpacked: under FX tracing it is one Proxy
                self.values.append(tuple(copies[i] for i in range(1, self.n_copies)))
                out = copies[0]
            else:
                self.values.append(out)
        return out

    def arm(self) -> None:
        self.values = []
        self.armed = True

    def disarm(self) -> None:
        self.armed = False
        self.values = []

    def take(self, model_name: str) -> Any:
        """The one output recorded since `arm`; raises when there is none or several."""
        if len(self.values) == 1:
            return self.values[0]
        if not self.values:
            if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
                raise C2ALError(
                    f"c2al: at={self.name!r} did not run while {model_name} was FX-traced: the tracer kept it "
                    f"(or a module above it) as a leaf; c2al marks them traceable for TorchRec's and torch.fx's "
                    f"tracers, a custom tracer must trace through them too"
                )
            raise C2ALError(
                f"c2al: at={self.name!r} produced no output during {model_name}'s forward (it was not called); "
                f"name a submodule that the model's forward calls"
            )
        raise C2ALError(
            f"c2al: at={self.name!r} ran {len(self.values)} times in one forward of {model_name}, so its "
            f"output is ambiguous; name a submodule that runs once per forward"
        )


def aux_labels(labels: torch.Tensor, cohort_ids: torch.Tensor, n_cohorts: int) -> torch.Tensor:
    """The C2AL auxiliary targets y_k = y * 1[cohort == k].

    A positive outside every exposed cohort (cohort id -1) gets target 0 on
    every head: the partial conflict with the primary label is the point.

    Args:
        labels: [B] primary labels in {0, 1} (or [B, 1]), float.
        cohort_ids: [B] int cohort of each row, -1 for none.
        n_cohorts: K.

    Returns:
        [B, K] targets in the labels' dtype.

    Example:
        >>> aux_labels(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0, -1, 1]), 2)
        tensor([[1., 0.],
                [0., 0.],
                [0., 0.]])
    """
    y = labels.reshape(-1, 1)  # [B, 1]
    cohorts = torch.arange(n_cohorts, device=cohort_ids.device)  # [K]
    member = cohort_ids.reshape(-1, 1) == cohorts  # [B, K]
    return y * member.to(y.dtype)  # [B, K]


class C2ALWrapper(nn.Module):
    """A model plus K cohort heads reading one of its submodules; build it with `attach`.

    Attributes:
        model: the user's model object, unmodified apart from the tap on `at`.
        heads: K auxiliary heads, each mapping the [B, H] representation to [B, 1].
        at: dotted name of the submodule whose output is the shared representation.
        n_cohorts: K.
        aux_weights: lambda_k per cohort.
        aux_labels: "conflicting" (the paper) or "own" (see `attach`).
        in_features: H when known before the first forward, else None.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> wrapper = attach(net, at="0", n_cohorts=2)
        >>> out = wrapper(torch.randn(5, 4))
        >>> out.logits.shape, out.aux_logits.shape
        (torch.Size([5, 1]), torch.Size([5, 2]))
    """

    def __init__(
        self,
        model: nn.Module,
        at: str,
        n_cohorts: int,
        aux_weight: float | Sequence[float] = 0.1,
        head: HeadSpec = None,
        *,
        in_features: int | None = None,
        aux_labels: str = "conflicting",
        balance: str = "none",
        relax: float = balance_mod.RELAX,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise C2ALError(f"c2al.attach: model must be an nn.Module, got {type(model).__name__}")
        if not _is_int(n_cohorts) or n_cohorts < 1:
            raise C2ALError(f"c2al.attach: n_cohorts must be an int >= 1, got {n_cohorts!r}")
        if head is not None and not isinstance(head, nn.Module) and not callable(head):
            raise C2ALError(
                f"c2al.attach: head must be None, an nn.Module to clone or a callable in_features -> nn.Module, "
                f"got {type(head).__name__}"
            )
        if aux_labels not in AUX_LABEL_MODES:
            raise C2ALError(f"c2al.attach: aux_labels must be one of {AUX_LABEL_MODES}, got {aux_labels!r}")
        target = _find_submodule(model, at)
        _refuse_double_attach(target, at)
        self.model = model
        self.at = at
        self.n_cohorts = int(n_cohorts)
        self.aux_weights: tuple[float, ...] = _aux_weights(aux_weight, n_cohorts)
        self.aux_labels: str = aux_labels
        self.balance: str = balance_mod.check_mode(balance)
        self.relax = float(relax)
        self.in_features: int | None = _resolve_width(model, target, at, head, in_features)
        device = _dense_device(model, target)
        self.heads = nn.ModuleList(_build_head(head, self.in_features, device) for _ in range(n_cohorts))
        # Plain attributes (not submodules): the tap must not appear in state_dict or parameters().
        self._tap: _Tap | None = _Tap(target, at, target.__dict__.get("forward"))
        self._marks: list[tuple[nn.Module, str, bool, Any]] = _mark_traceable(_module_path(model, at))
        if self.balance != "none":
            k, mode, relax = self.n_cohorts, self.balance, self.relax
            self._tap.split = lambda rep: balance_mod.split(rep, k, mode, relax)
            self._tap.n_copies = k + 1
        setattr(target, "forward", self._tap.forward)

    def forward(self, *args: Any, **kwargs: Any) -> AuxOutput:
        """Run the model on its own arguments and the heads on the captured representation.

        Args:
            *args: the model's positional arguments, e.g. (dense_features, sparse_features).
            **kwargs: the model's keyword arguments.

        Returns:
            AuxOutput(logits=the model's output unchanged, aux_logits=[B, K]).
        """
        tap = self._tap
        if tap is None:
            raise C2ALError("c2al: this wrapper was detached; call the model returned by c2al.detach instead")
        tap.arm()
        try:
            logits = self.model(*args, **kwargs)
            rep = tap.take(type(self.model).__name__)
        finally:
            tap.disarm()
        return AuxOutput(logits, self._aux_logits(rep))

    def _aux_logits(self, rep: Any) -> torch.Tensor:
        if isinstance(rep, tuple):  # a balance mode: head k reads its own copy of the representation
            return torch.cat([self.heads[k](self._flat(r)).reshape(r.shape[0], 1) for k, r in enumerate(rep)], dim=1)  # [B, K]
        flat = self._flat(rep)  # once for every head: their gradients meet here, summed as without balance
        return torch.cat([h(flat).reshape(rep.shape[0], 1) for h in self.heads], dim=1)  # [B, K]

    def _flat(self, rep: Any) -> torch.Tensor:
        """The representation as [B, H] rows, checked against the heads' width."""
        tracing = torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        if not isinstance(rep, (torch.Tensor, torch.fx.Proxy)):
            raise C2ALError(
                f"c2al: at={self.at!r} returned a {type(rep).__name__}, not a tensor; name a submodule "
                f"whose output is a [B, H] (or [B, ...]) tensor"
            )
        flat = rep.unsqueeze(-1).flatten(1)  # [B, H]; [B, F, D] -> [B, F*D]; [B] -> [B, 1]; also for B = 0
        if not tracing and self.in_features is not None and flat.shape[1] != self.in_features:
            raise C2ALError(
                f"c2al: at={self.at!r} produced width {flat.shape[1]} but the heads were built for "
                f"in_features={self.in_features}; pass the right in_features= to c2al.attach"
            )
        return flat

    def loss(
        self,
        output: AuxOutput,
        labels: torch.Tensor,
        cohort_ids: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The C2AL objective: BCE(logits, y) + sum_k lambda_k BCE(aux_k, y * 1[cohort == k]).

        Every term is a mean over rows weighted by `weights` (rows of weight 0,
        the padding of an evaluation shard, drop out), all over the same
        denominator, the main term's row count (see `c2al.losses.bce_with_logits`).
        With aux_labels="own", rows outside cohort k also drop out of head k's
        term (same denominator), so head k sees only its cohort's labels.

        Args:
            output: what this wrapper's forward returned.
            labels: [B] (or [B, 1]) primary labels in {0, 1}.
            cohort_ids: [B] int cohort per row, -1 outside every exposed cohort.
            weights: [B] row weights; None for all ones.

        Returns:
            (scalar loss, parts) with parts = {"main": ..., "aux": sum_k lambda_k aux_k,
            "aux_0": ..., ..., "aux_{K-1}": ...}. "main" and "aux" keep their graph
            (a train wrapper that replaces the main term, like in-batch softmax, adds
            "aux" to its own); the per-cohort "aux_k" are detached, unweighted, for logging.
        """
        logits = output.logits.reshape(-1)  # [B]
        y = labels.reshape(-1).to(logits.dtype)  # [B]
        w = torch.ones_like(y) if weights is None else weights.reshape(-1).to(y.dtype)  # [B]
        denom = w.sum()
        main = bce_with_logits(logits, y, w, denominator=denom)
        targets = aux_labels(y, cohort_ids, self.n_cohorts)  # [B, K]
        row_w = w.unsqueeze(1)  # [B, 1]
        if self.aux_labels == "own":  # a multi-task control: no conflicting zero labels from other rows
            row_w = row_w * aux_labels(torch.ones_like(y), cohort_ids, self.n_cohorts)  # [B, K] membership
        per_cohort = bce_with_logits(output.aux_logits, targets, row_w, denominator=denom)  # [K]
        lambdas = per_cohort.new_tensor(self.aux_weights)  # [K]
        aux = (lambdas * per_cohort).sum()
        parts = {"main": main, "aux": aux}
        for k in range(self.n_cohorts):
            parts[f"aux_{k}"] = per_cohort[k].detach()
        return main + aux, parts

    def extra_repr(self) -> str:
        extra = "" if self.aux_labels == "conflicting" else f", aux_labels={self.aux_labels!r}"
        extra += "" if self.balance == "none" else f", balance={self.balance!r}"
        return f"at={self.at!r}, n_cohorts={self.n_cohorts}, aux_weights={list(self.aux_weights)}{extra}"


def attach(
    model: nn.Module,
    at: str,
    n_cohorts: int,
    aux_weight: float | Sequence[float] = 0.1,
    head: HeadSpec = None,
    *,
    in_features: int | None = None,
    aux_labels: str = "conflicting",
    balance: str = "none",
    relax: float = balance_mod.RELAX,
) -> C2ALWrapper:
    """Wrap `model` with K cohort heads reading the output of its submodule `at`.

    The model is not subclassed or copied: the wrapper holds the same object
    and its parameters. Attach before sharding: wrap as
    `shard(TrainModule(attach(model, ...)), info)`.

    Args:
        model: any nn.Module (c2al's AFM / AttentionFM / TwoTower, TorchRec's DLRM, DLRM_DCN,
            SimpleDeepFMNN, ...).
        at: dotted name of the submodule whose output is the shared representation,
            e.g. "inter_arch". Not an EmbeddingBagCollection (see module docstring).
        n_cohorts: K >= 1, the number of exposed cohorts (cohort ids 0..K-1).
        aux_weight: lambda, one float for every head or one per cohort.
        head: None for a small MLP (Linear(H, h), ReLU, Linear(h, 1) with h = clamp(H, 4, 64));
            an nn.Module to clone per cohort with fresh parameters (e.g. `model.over_arch`, the
            paper's choice); or a callable `in_features -> nn.Module`.
        in_features: H, the representation width, when it cannot be inferred (see module docstring).
        aux_labels: "conflicting" (the paper, default): head k learns y * 1[cohort == k] on every
            row, so positives outside cohort k are pulled to 0. "own": head k learns y on cohort k's
            rows only (a multi-task baseline without conflicting labels; same loss denominator).
        balance: how each head's gradient reaches the trunk at `at` (see `c2al.balance`): "none"
            (the plain sum), "agree" (only where it agrees with the main gradient), "project"
            (its component opposing the main gradient removed), "magnitude" (rescaled toward the
            main gradient's norm), "magnitude+agree", "magnitude+project"; "gate" and
            "magnitude+gate", the old spellings of the agree modes, give the same modes.
        relax: the relax factor r of the magnitude modes.

    Returns:
        A C2ALWrapper: forward returns AuxOutput; `.loss(output, labels, cohort_ids, weights)`.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> wrapper = attach(net, at="0", n_cohorts=2, aux_weight=[0.1, 0.2])
        >>> out = wrapper(torch.randn(3, 4))
        >>> loss, parts = wrapper.loss(out, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, -1]))
        >>> sorted(parts)
        ['aux', 'aux_0', 'aux_1', 'main']
        >>> detach(wrapper) is net
        True
    """
    return C2ALWrapper(model, at, n_cohorts, aux_weight, head, in_features=in_features, aux_labels=aux_labels,
                       balance=balance, relax=relax)


def detach(wrapper: C2ALWrapper) -> nn.Module:
    """Remove the tap and return the original model object, as it was before `attach`.

    The heads stay behind in the (now unusable) wrapper; the returned model has
    no c2al hook, attribute or parameter, so its outputs equal the wrapper's
    `logits` and its serving cost is the base model's. After a
    TrainPipelineSparseDist, call `pipeline.detach()` first so the sharded
    modules get their own forwards back.

    Args:
        wrapper: what `attach` returned (reach it as `dmp.module.model` through
            DistributedModelParallel and TrainModule).

    Returns:
        The model that was passed to `attach`.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> detach(attach(net, at="0", n_cohorts=1)) is net
        True
    """
    if not isinstance(wrapper, C2ALWrapper):
        raise C2ALError(f"c2al.detach: expected what c2al.attach returned, got {type(wrapper).__name__}")
    tap = wrapper._tap
    if tap is None:
        raise C2ALError("c2al.detach: this wrapper was already detached")
    current = tap.module.__dict__.get("forward")
    if getattr(current, "__self__", None) is not tap:
        raise C2ALError(
            f"c2al.detach: the forward of {wrapper.at!r} was replaced after c2al.attach; "
            f"undo that replacement first"
        )
    if tap.previous is None:
        del tap.module.__dict__["forward"]
    else:
        tap.module.__dict__["forward"] = tap.previous
    for module, name, existed, old in reversed(wrapper._marks):
        if existed:
            module.__dict__[name] = old
        else:
            module.__dict__.pop(name, None)
    wrapper._marks = []
    wrapper._tap = None
    return wrapper.model


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _find_submodule(model: nn.Module, at: str) -> nn.Module:
    if not isinstance(at, str) or not at:
        raise C2ALError(f"c2al.attach: at must name a submodule of the model, got {at!r}")
    names = [n for n, _ in model.named_modules() if n]
    try:
        target = model.get_submodule(at)
    except AttributeError:
        close = difflib.get_close_matches(at, names, n=3)
        shown = close or [n for n, _ in model.named_children()][:8] or names[:8]
        raise C2ALError(
            f"c2al.attach: {type(model).__name__} has no submodule at={at!r}; available include {shown}"
        ) from None
    if _is_embedding_collection(target):
        raise C2ALError(
            f"c2al.attach: at={at!r} is the {type(target).__name__} itself; its output is a KeyedTensor of "
            f"per-table lookups, not a shared representation, and DistributedModelParallel replaces this "
            f"object when sharding, which would drop the tap; name the module that consumes it "
            f"(e.g. the sparse arch or the interaction arch)"
        )
    return target


def _is_embedding_collection(module: nn.Module) -> bool:
    # A model can only hold instances of classes whose module is imported: look there, import nothing.
    unsharded = sys.modules.get("torchrec.modules.embedding_modules")
    sharded = sys.modules.get("torchrec.distributed.types")
    return (
        unsharded is not None
        and isinstance(module, (unsharded.EmbeddingBagCollection, unsharded.EmbeddingCollection))
    ) or (sharded is not None and isinstance(module, sharded.ShardedModule))


def _module_path(model: nn.Module, at: str) -> list[nn.Module]:
    """The modules from just below `model` down to `at` inclusive."""
    parts = at.split(".")
    return [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]


def _refuse_double_attach(target: nn.Module, at: str) -> None:
    if isinstance(getattr(target.__dict__.get("forward"), "__self__", None), _Tap):
        raise C2ALError(f"c2al.attach: at={at!r} already feeds another c2al wrapper; c2al.detach that one first")


def _aux_weights(aux_weight: float | Sequence[float], n_cohorts: int) -> tuple[float, ...]:
    if isinstance(aux_weight, numbers.Real) and not isinstance(aux_weight, bool):
        weights = (float(aux_weight),) * n_cohorts
    else:
        try:
            weights = tuple(float(x) for x in aux_weight)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise C2ALError(f"c2al.attach: aux_weight must be a float or a sequence of floats, got {aux_weight!r}") from None
        if len(weights) != n_cohorts:
            raise C2ALError(
                f"c2al.attach: aux_weight has {len(weights)} values but n_cohorts={n_cohorts}; give one per cohort"
            )
    if not all(math.isfinite(x) and x >= 0 for x in weights):
        raise C2ALError(f"c2al.attach: aux_weight values must be finite and >= 0, got {list(weights)}")
    return weights


def _embedding_dim(model: nn.Module) -> int | None:
    """The common embedding dim of the model's EBC tables, or None if absent or mixed."""
    dims = {
        cfg.embedding_dim
        for m in model.modules()
        if callable(getattr(m, "embedding_bag_configs", None))
        for cfg in m.embedding_bag_configs()
    }
    return dims.pop() if len(dims) == 1 else None


def _last_linear_out(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _infer_width(model: nn.Module, target: nn.Module) -> int | None:
    """H without a forward, where the module's own config says it; None otherwise."""
    width = getattr(target, "out_features", None)
    if _is_int(width):
        return int(width)
    dlrm = sys.modules.get("torchrec.models.dlrm")  # only look at TorchRec classes if they are loaded
    deepfm = sys.modules.get("torchrec.models.deepfm")
    mlp = sys.modules.get("torchrec.modules.mlp")
    dim = _embedding_dim(model)
    if dlrm is not None and dim is not None:
        if isinstance(target, dlrm.InteractionArch):
            return dim + target.F * (target.F + 1) // 2  # dense + F dense-sparse + C(F, 2) sparse-sparse dots
        if isinstance(target, dlrm.InteractionDCNArch):
            return (target.F + 1) * dim
    if deepfm is not None and dim is not None and isinstance(target, deepfm.FMInteractionArch):
        deep = _last_linear_out(target.deep_fm)
        return None if deep is None else dim + deep + 1  # dense, deep interaction, FM term
    stacks: tuple[type, ...] = (nn.Sequential,)
    stacks += (mlp.MLP,) if mlp is not None else ()
    stacks += (dlrm.DenseArch, dlrm.OverArch) if dlrm is not None else ()
    stacks += (deepfm.DenseArch, deepfm.OverArch) if deepfm is not None else ()
    return _last_linear_out(target) if isinstance(target, stacks) else None


def _resolve_width(
    model: nn.Module, target: nn.Module, at: str, head: HeadSpec, in_features: int | None
) -> int | None:
    """H from `in_features=` or the modules' configs; None where a clone or a LazyLinear does without."""
    if in_features is not None:
        if not _is_int(in_features) or in_features < 1:
            raise C2ALError(f"c2al.attach: in_features must be an int >= 1, got {in_features!r}")
        return int(in_features)
    if isinstance(head, nn.Module):  # a clone takes the representation as the original head does
        return None
    width = _infer_width(model, target)
    if width is None:
        _check_lazy_allowed(model, at, head)
    return width


def _check_lazy_allowed(model: nn.Module, at: str, head: HeadSpec) -> None:
    if head is not None:
        raise C2ALError(
            f"c2al.attach: cannot tell the output width of at={at!r} without running the model, and a "
            f"head callable needs it; pass in_features="
        )
    if any(p.is_meta for p in model.parameters()):
        raise C2ALError(
            f"c2al.attach: cannot tell the output width of at={at!r} without a forward, and the model has "
            f"parameters on the meta device, so none can run before sharding; pass in_features="
        )


def _dense_device(model: nn.Module, target: nn.Module) -> torch.device:
    """Where the heads go: with `at`'s dense parameters, else the model's (tables may sit on meta)."""
    tables = {id(p) for m in model.modules() if _is_embedding_collection(m) for p in m.parameters()}
    for p in itertools.chain(target.parameters(), model.parameters()):
        if id(p) not in tables:
            return p.device
    return torch.device("cpu")


def default_head(in_features: int | None, device: torch.device | None = None) -> nn.Module:
    """The head used when `head=None`: Linear(H, h), ReLU, Linear(h, 1), h = clamp(H, 4, 64).

    Args:
        in_features: H; None for a LazyLinear first layer (h = 32) sized at the first forward.
        device: where the parameters are created.

    Returns:
        A module mapping [B, H] to [B, 1].

    Example:
        >>> default_head(10)(torch.randn(2, 10)).shape
        torch.Size([2, 1])
    """
    if in_features is None:
        first: nn.Module = nn.LazyLinear(_LAZY_HIDDEN, device=device)
        hidden = _LAZY_HIDDEN
    else:
        hidden = max(4, min(64, in_features))
        first = nn.Linear(in_features, hidden, device=device)
    return nn.Sequential(first, nn.ReLU(), nn.Linear(hidden, 1, device=device))


def _build_head(head: HeadSpec, in_features: int | None, device: torch.device) -> nn.Module:
    if head is None:
        return default_head(in_features, device)
    if isinstance(head, nn.Module):
        return _fresh_clone(head)
    built = head(in_features)
    if not isinstance(built, nn.Module):
        raise C2ALError(f"c2al.attach: head({in_features}) must return an nn.Module, got {type(built).__name__}")
    return built


def _fresh_clone(module: nn.Module) -> nn.Module:
    """A deep copy with every `reset_parameters` re-run: same architecture, new parameters."""
    clone = copy.deepcopy(module)
    with torch.no_grad():
        for m in clone.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return clone


def _is_torch_builtin(module: nn.Module) -> bool:
    name = type(module).__module__
    return name.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(module, nn.Sequential)


def _mark_traceable(path: list[nn.Module]) -> list[tuple[nn.Module, str, bool, Any]]:
    """Opt `path` out of TorchRec's and torch.fx's leaf modules; returns how to undo it."""
    marks: list[tuple[nn.Module, str, bool, Any]] = []

    def put(module: nn.Module, name: str, value: Any) -> None:
        existed = name in module.__dict__
        marks.append((module, name, existed, module.__dict__.get(name)))
        module.__dict__[name] = value

    for module in path:
        put(module, _TORCHREC_LEAF_OPT_OUT, True)
        if _is_torch_builtin(module):
            # torch.fx's default is_leaf_module reads m.__module__; an instance value shadows the class's.
            put(module, "__module__", __name__)
    return marks
