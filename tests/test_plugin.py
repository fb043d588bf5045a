"""The c2al plugin on unsharded models: outputs, loss, labels, heads, detach, tracing, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from plugin_support import OUR_MODELS, TORCHREC_MODELS, B, K, build, make_batch
from torch import nn

import c2al
from c2al.errors import C2ALError
from c2al.plugin import AuxOutput, C2ALWrapper, aux_labels


def run(model: nn.Module, seed: int = 0):
    batch = make_batch(seed)
    return model(batch.dense, batch.sparse)


def module_dicts(model: nn.Module) -> dict[str, set[str]]:
    """Every submodule's instance attribute names: attach may add some, detach must remove them."""
    return {name: set(m.__dict__) for name, m in model.named_modules()}


def table_grads(model: nn.Module) -> torch.Tensor:
    ebc = model.sparse_arch.embedding_bag_collection
    return torch.cat([bag.weight.grad.flatten() for bag in ebc.embedding_bags.values()])


def bce(x: float, y: float) -> float:
    p = 1.0 / (1.0 + math.exp(-x))
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


# --- outputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OUR_MODELS + TORCHREC_MODELS)
def test_forward_returns_model_logits_and_aux_logits_of_shape_b_k(name):
    model = build(name)
    expected = run(model)
    out = c2al.attach(model, "inter_arch", K)(*_inputs())
    assert isinstance(out, AuxOutput)
    assert torch.equal(out.logits, expected)  # [B] ours, [B, 1] TorchRec's
    assert out.aux_logits.shape == (B, K)


def _inputs():
    batch = make_batch(0)
    return batch.dense, batch.sparse


def test_representation_of_rank_three_is_flattened():
    model = build("dlrm")
    wrapper = c2al.attach(model, "sparse_arch", K, in_features=2 * 4)  # [B, F=2, D=4] -> [B, 8]
    assert wrapper(*_inputs()).aux_logits.shape == (B, K)


# --- loss and labels ---------------------------------------------------------------------------


def test_aux_labels_mask_positives_by_cohort():
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    cohorts = torch.tensor([0, 1, -1, 0, 1])
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert torch.equal(aux_labels(labels, cohorts, 2), expected)


def test_loss_equals_hand_computed_bce_composition():
    wrapper = c2al.attach(build("afm"), "inter_arch", 2, aux_weight=[0.5, 2.0])
    logits = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)
    aux = torch.tensor([[0.5, -0.5], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    cohorts = torch.tensor([0, -1, 1])  # row 1 is a positive outside every cohort: aux targets (0, 0)
    loss, parts = wrapper.loss(AuxOutput(logits, aux), labels, cohorts)
    main = (bce(0.0, 1) + bce(2.0, 1) + bce(-1.0, 0)) / 3
    aux0 = (bce(0.5, 1) + bce(1.0, 0) + bce(0.0, 0)) / 3
    aux1 = (bce(-0.5, 0) + bce(0.0, 0) + bce(3.0, 0)) / 3
    assert loss.item() == pytest.approx(main + 0.5 * aux0 + 2.0 * aux1, abs=1e-12)
    assert parts["main"].item() == pytest.approx(main, abs=1e-12)
    assert parts["aux_0"].item() == pytest.approx(aux0, abs=1e-12)
    assert parts["aux_1"].item() == pytest.approx(aux1, abs=1e-12)
    assert not any(p.requires_grad for p in parts.values())


def test_loss_ignores_rows_of_weight_zero():
    wrapper = c2al.attach(build("afm"), "inter_arch", K)
    out = AuxOutput(torch.tensor([0.3, -1.0, 2.0]), torch.tensor([[0.1, 0.2], [-0.3, 0.4], [1.0, -2.0]]))
    weights = torch.tensor([1.0, 1.0, 0.0])
    first, _ = wrapper.loss(out, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, 1]), weights=weights)
    flipped, _ = wrapper.loss(out, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, 1, -1]), weights=weights)
    kept = AuxOutput(out.logits[:2], out.aux_logits[:2])
    two_rows, _ = wrapper.loss(kept, torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))
    assert first.item() == flipped.item()
    assert first.item() == pytest.approx(two_rows.item(), abs=1e-7)


def test_loss_accepts_logits_of_shape_b_1():
    model = build("dlrm")
    wrapper = c2al.attach(model, "inter_arch", K, aux_weight=0.0)
    batch = make_batch(0)
    out = wrapper(batch.dense, batch.sparse)
    assert out.logits.shape == (B, 1)
    loss, _ = wrapper.loss(out, batch.labels, batch.cohort_ids)
    plain = nn.functional.binary_cross_entropy_with_logits(out.logits.squeeze(1), batch.labels)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)


# --- heads -------------------------------------------------------------------------------------


def test_default_head_is_mlp_sized_from_representation():
    model = build("attention_fm")
    wrapper = c2al.attach(model, "inter_arch", K)
    width = model.inter_arch.out_features
    assert wrapper.in_features == width
    for head in wrapper.heads:
        assert isinstance(head[0], nn.Linear) and head[0].in_features == width
        assert head[-1].out_features == 1


def test_module_head_is_cloned_with_fresh_parameters():
    model = build("attention_fm")
    before = {k: v.clone() for k, v in model.over_arch.state_dict().items()}
    wrapper = c2al.attach(model, "inter_arch", K, head=model.over_arch)
    model_ids = {id(p) for p in model.parameters()}
    for head in wrapper.heads:
        assert type(head) is type(model.over_arch)
        assert not {id(p) for p in head.parameters()} & model_ids
        assert any(not torch.equal(v, head.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(wrapper.heads[0].model[0].weight, wrapper.heads[1].model[0].weight)
    assert all(torch.equal(v, model.over_arch.state_dict()[k]) for k, v in before.items())


def test_callable_head_gets_the_representation_width():
    widths = []

    def make(n: int) -> nn.Module:
        widths.append(n)
        return nn.Linear(n, 1)

    model = build("dlrm_dcn")
    wrapper = c2al.attach(model, "inter_arch", K, head=make)
    assert widths == [3 * 4] * K  # (F + 1) * D
    assert wrapper.heads[0] is not wrapper.heads[1]
    assert wrapper(*_inputs()).aux_logits.shape == (B, K)


def test_unknown_width_falls_back_to_lazy_first_layer():
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    wrapper = c2al.attach(net, "1", K)  # nn.Tanh has no width to read
    assert wrapper.in_features is None
    assert wrapper(torch.randn(4, 3)).aux_logits.shape == (4, K)
    assert wrapper.heads[0][0].weight.shape == (32, 5)


def test_wrong_in_features_is_reported_at_forward():
    wrapper = c2al.attach(build("afm"), "inter_arch", K, in_features=7)
    with pytest.raises(C2ALError, match="in_features=7"):
        wrapper(*_inputs())


# --- gradients ---------------------------------------------------------------------------------


def test_aux_gradients_reach_the_embedding_tables():
    model = build("afm")
    batch = make_batch(0)

    def grads_with(aux_weight: float) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        wrapper = c2al.attach(model, "inter_arch", K, aux_weight=aux_weight)
        loss, _ = wrapper.loss(wrapper(batch.dense, batch.sparse), batch.labels, batch.cohort_ids)
        loss.backward()
        c2al.detach(wrapper)
        return table_grads(model)

    off, on = grads_with(0.0), grads_with(1.0)
    model.zero_grad(set_to_none=True)
    nn.functional.binary_cross_entropy_with_logits(model(batch.dense, batch.sparse), batch.labels).backward()
    assert torch.equal(off, table_grads(model))  # lambda = 0: the tables see the main loss only
    assert not torch.allclose(on, off)


# --- detach ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["afm", "dlrm"])
def test_detach_restores_the_original_model(name):
    model = build(name)
    params = {id(p) for p in model.parameters()}
    dicts = module_dicts(model)
    wrapper = c2al.attach(model, "inter_arch", K)
    assert module_dicts(model) != dicts  # the tap is on while attached
    logits = wrapper(*_inputs()).logits
    assert c2al.detach(wrapper) is model
    assert {id(p) for p in model.parameters()} == params
    assert module_dicts(model) == dicts
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(*_inputs()), logits)


def test_detached_wrapper_refuses_forward_and_second_detach():
    wrapper = c2al.attach(build("afm"), "inter_arch", K)
    c2al.detach(wrapper)
    with pytest.raises(C2ALError, match="detached"):
        wrapper(*_inputs())
    with pytest.raises(C2ALError, match="already detached"):
        c2al.detach(wrapper)


def test_state_dict_keys_are_the_model_keys_plus_heads():
    model = build("afm")
    keys = set(model.state_dict())
    wrapper = c2al.attach(model, "inter_arch", K)
    wrapped = set(wrapper.state_dict())
    assert {k[len("model."):] for k in wrapped if k.startswith("model.")} == keys
    assert {k.split(".")[0] for k in wrapped} == {"model", "heads"}


# --- FX tracing --------------------------------------------------------------------------------


class _Root(nn.Module):
    """Calls the wrapper, as TrainModule does, so the wrapper is traced as a submodule."""

    def __init__(self, wrapper: C2ALWrapper) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.wrapper(x)
        return out.logits, out.aux_logits


def test_torch_nn_builtin_at_is_traced_through_by_fx():
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1))
    root = _Root(c2al.attach(net, "0", K))  # nn.Linear: a leaf for torch.fx by default
    graph_module = torch.fx.symbolic_trace(root)
    x = torch.randn(5, 3)
    for got, want in zip(graph_module(x), root(x)):
        assert torch.equal(got, want)
    assert any(n.target == "wrapper.heads.1.0" for n in graph_module.graph.nodes)


def test_tracer_that_keeps_at_as_leaf_raises():
    class KeepLeaf(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return name == "wrapper.model.0" or super().is_leaf_module(m, name)

    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1))
    with pytest.raises(C2ALError, match="did not run while"):
        KeepLeaf().trace(_Root(c2al.attach(net, "0", K)))


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_at_lists_available_submodules():
    with pytest.raises(C2ALError, match=r"inter_ach.*inter_arch"):
        c2al.attach(build("afm"), "inter_ach", K)


def test_at_on_the_embedding_bag_collection_is_refused():
    with pytest.raises(C2ALError, match=r"sparse_arch.embedding_bag_collection.*EmbeddingBagCollection"):
        c2al.attach(build("afm"), "sparse_arch.embedding_bag_collection", K)


@pytest.mark.parametrize("n_cohorts", [0, -1, 1.5])
def test_n_cohorts_below_one_is_refused(n_cohorts):
    with pytest.raises(C2ALError, match="n_cohorts"):
        c2al.attach(build("afm"), "inter_arch", n_cohorts)


def test_wrong_number_of_aux_weights_is_refused():
    with pytest.raises(C2ALError, match=r"aux_weight has 3 values but n_cohorts=2"):
        c2al.attach(build("afm"), "inter_arch", 2, aux_weight=[0.1, 0.2, 0.3])


def test_negative_aux_weight_is_refused():
    with pytest.raises(C2ALError, match="aux_weight"):
        c2al.attach(build("afm"), "inter_arch", 2, aux_weight=[0.1, -0.2])


def test_submodule_not_called_in_forward_is_reported():
    model = build("afm")
    model.spare = nn.Linear(3, 4)  # registered, never called by AFM.forward
    wrapper = c2al.attach(model, "spare", K)
    with pytest.raises(C2ALError, match=r"'spare' produced no output"):
        wrapper(*_inputs())


def test_non_tensor_representation_is_refused():
    model = build("deepfm")  # its sparse_arch returns a KeyedTensor
    wrapper = c2al.attach(model, "sparse_arch", K, in_features=8)
    with pytest.raises(C2ALError, match=r"'sparse_arch' returned a KeyedTensor"):
        wrapper(*_inputs())


def test_attaching_twice_to_the_same_submodule_is_refused():
    model = build("afm")
    c2al.attach(model, "inter_arch", K)
    with pytest.raises(C2ALError, match="already feeds"):
        c2al.attach(model, "inter_arch", K)


def test_unknown_width_on_meta_tables_asks_for_in_features():
    model = build("afm", table_device="meta")
    with pytest.raises(C2ALError, match="in_features="):
        c2al.attach(model, "inter_arch.hidden.1", K)  # a ReLU: nothing says its width


def test_bad_head_type_is_refused():
    with pytest.raises(C2ALError, match="head must be"):
        c2al.attach(build("afm"), "inter_arch", K, head="linear")
