"""Models (AFM, AttentionFM, TwoTower), their building blocks and the losses."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchrec.distributed.train_pipeline.tracing import Tracer
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from c2al.data.schema import Schema, SparseFeature
from c2al.errors import C2ALError
from c2al.losses import bce_with_logits, in_batch_softmax_loss
from c2al.models import AFM, AttentionFM, SparseArch, TwoTower, make_ebc, registry
from c2al.models.afm import AFMInteractionArch
from c2al.models.attention_fm import AttentionFMInteractionArch
from c2al.models.fields import FieldArch

D = 4
B = 6
MODELS = ("afm", "attention_fm", "two_tower")


pytestmark = pytest.mark.usefixtures("one_thread")


def small_schema(n_dense: int = 2) -> Schema:
    return Schema(
        sparse=(
            SparseFeature("a", 8, side="user"),
            SparseFeature("b", 8, side="item"),
            SparseFeature("c", 5, side="context", multi_hot=True),
        ),
        dense=tuple(f"x{i}" for i in range(n_dense)),
    )


def random_kjt(schema: Schema, batch: int, gen: torch.Generator) -> KeyedJaggedTensor:
    """Random ids; multi-hot fields get 0-3 ids per row (empty bags included)."""
    lengths, values = [], []
    for f in schema.sparse:
        n = torch.randint(0, 4, (batch,), generator=gen) if f.multi_hot else torch.ones(batch, dtype=torch.long)
        lengths.append(n)
        values.append(torch.randint(0, f.num_embeddings, (int(n.sum()),), generator=gen))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=schema.feature_names, values=torch.cat(values), lengths=torch.cat(lengths).int()
    )


def build(name: str, schema: Schema, ebc: EmbeddingBagCollection | None = None) -> nn.Module:
    ebc = make_ebc(schema, D) if ebc is None else ebc
    n_dense = len(schema.dense)
    if name == "afm":
        return AFM(ebc, n_dense, attention_dim=8)
    if name == "attention_fm":
        return AttentionFM(ebc, n_dense, rank=3, attention_hidden=16, over_sizes=(16,))
    return TwoTower(ebc, schema.user_features, schema.item_features, n_dense, layer_sizes=(16, 8))


def inputs(schema: Schema, batch: int = B, seed: int = 0) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, len(schema.dense), generator=gen), random_kjt(schema, batch, gen)


def ebc_of(model: nn.Module) -> EmbeddingBagCollection:
    return next(m for m in model.modules() if isinstance(m, EmbeddingBagCollection))


# ---------------------------------------------------------------- building blocks


def test_make_ebc_builds_one_table_per_feature_pooled_by_kind() -> None:
    configs = make_ebc(small_schema(), D).embedding_bag_configs()
    assert [c.name for c in configs] == ["t_a", "t_b", "t_c"]
    assert [c.feature_names for c in configs] == [["a"], ["b"], ["c"]]
    assert [c.pooling for c in configs] == [PoolingType.SUM, PoolingType.SUM, PoolingType.MEAN]
    assert {c.embedding_dim for c in configs} == {D}


@pytest.mark.parametrize("name", MODELS)
def test_models_build_around_meta_ebc_with_dense_parts_on_cpu(name: str) -> None:
    model = build(name, small_schema(), make_ebc(small_schema(), D, device="meta"))
    ebc = ebc_of(model)
    assert all(p.is_meta for p in ebc.parameters())
    ebc_ids = {id(p) for p in ebc.parameters()}
    dense = [p for p in model.parameters() if id(p) not in ebc_ids]
    assert dense and all(p.device.type == "cpu" for p in dense)


def test_sparse_arch_stacks_pooled_embeddings_in_feature_order() -> None:
    schema = small_schema()
    ebc = make_ebc(schema, D)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "c"],
        values=torch.tensor([1, 2, 3, 4, 0, 2, 4]),
        lengths=torch.tensor([1, 1, 1, 1, 3, 0], dtype=torch.int32),
    )
    out = SparseArch(ebc)(kjt)
    w = {f: ebc.embedding_bags[f"t_{f}"].weight for f in "abc"}
    expected = torch.stack(
        [
            torch.stack([w["a"][1], w["b"][3], w["c"][[0, 2, 4]].mean(0)]),
            torch.stack([w["a"][2], w["b"][4], torch.zeros(D)]),  # an empty MEAN bag pools to 0
        ]
    )
    torch.testing.assert_close(out, expected)


def test_sparse_arch_rejects_tables_of_different_dims() -> None:
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=5, feature_names=["f1"]),
            EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=5, feature_names=["f2"]),
        ]
    )
    with pytest.raises(C2ALError, match="embedding_dim"):
        SparseArch(ebc)


# ---------------------------------------------------------------- shapes and wiring


@pytest.mark.parametrize("n_dense", [0, 2])
@pytest.mark.parametrize("name", MODELS)
def test_forward_returns_one_logit_per_row(name: str, n_dense: int) -> None:
    torch.manual_seed(0)
    schema = small_schema(n_dense)
    model = build(name, schema)
    dense, kjt = inputs(schema)
    assert model(dense, kjt).shape == (B,)


@pytest.mark.parametrize("name", ["afm", "attention_fm"])
def test_dense_arch_is_absent_without_dense_features(name: str) -> None:
    assert build(name, small_schema(0)).dense_arch is None
    assert build(name, small_schema(2)).dense_arch is not None


@pytest.mark.parametrize("n_dense", [0, 2])
@pytest.mark.parametrize("name", MODELS)
def test_inter_arch_output_is_read_once_with_declared_width(name: str, n_dense: int) -> None:
    torch.manual_seed(0)
    schema = small_schema(n_dense)
    model = build(name, schema)
    seen: list[torch.Tensor] = []
    model.inter_arch.register_forward_hook(lambda mod, args, out: seen.append(out))
    model(*inputs(schema))
    assert len(seen) == 1
    assert seen[0].shape == (B, model.inter_arch.out_features)


@pytest.mark.parametrize("name", MODELS)
def test_ebc_receives_the_kjt_argument_unmodified(name: str) -> None:
    """What TrainPipelineSparseDist needs: the EBC call's input is the forward's argument itself."""
    model = build(name, small_schema())
    ebc_path = next(n for n, m in model.named_modules() if isinstance(m, EmbeddingBagCollection))
    # Leaves as the pipeline would choose them once the EBC is sharded: everything not holding it.
    leaves = [n for n, _ in model.named_modules() if n and not ebc_path.startswith(n)] + [ebc_path]
    graph = Tracer(leaf_modules=leaves).trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == ebc_path]
    assert len(calls) == 1
    assert calls[0].args[0].op == "placeholder" and calls[0].args[0].target == "sparse_features"


def test_afm_rejects_a_single_field() -> None:
    schema = Schema(sparse=(SparseFeature("a", 5),))
    with pytest.raises(C2ALError, match="at least 2 fields"):
        AFM(make_ebc(schema, D), dense_in_features=0)


def test_two_tower_rejects_unknown_feature_by_name() -> None:
    schema = small_schema()
    with pytest.raises(C2ALError, match="item_features.*'nope'"):
        TwoTower(make_ebc(schema, D), ["a"], ["nope"])


# ---------------------------------------------------------------- shared field setup and the registry


def test_afm_and_attention_fm_share_one_field_arch() -> None:
    for cls in (AFM, AttentionFM):
        assert issubclass(cls, FieldArch)
        for method in ("field_embeddings", "attention_weights"):
            assert getattr(cls, method) is getattr(FieldArch, method), f"{cls.__name__} overrides {method}"


@pytest.mark.parametrize("cls", [AFM, AttentionFM])
def test_field_arch_rejects_negative_dense_features_naming_the_model(cls: type[nn.Module]) -> None:
    with pytest.raises(C2ALError, match=rf"^{cls.__name__}: dense_in_features must be >= 0, got -1"):
        cls(make_ebc(small_schema(), D), -1)


@pytest.mark.parametrize("n_dense", [0, 2])
@pytest.mark.parametrize("name", ["afm", "attention_fm"])
def test_field_embeddings_stack_sparse_fields_then_the_dense_field(name: str, n_dense: int) -> None:
    torch.manual_seed(0)
    schema = small_schema(n_dense)
    model = build(name, schema)
    dense, kjt = inputs(schema)
    fields = model.field_embeddings(dense, kjt)
    assert fields.shape == (B, model.num_fields, D) and model.num_fields == 3 + (n_dense > 0)
    torch.testing.assert_close(fields[:, :3], model.sparse_arch(kjt))
    if n_dense:
        torch.testing.assert_close(fields[:, 3], model.dense_arch(dense))


def test_registry_names_are_the_config_model_choices() -> None:
    from c2al.config import MODELS

    assert registry.MODEL_NAMES == MODELS == registry.model_names()


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_registry_builds_every_name_into_a_working_model(name: str) -> None:
    torch.manual_seed(0)
    schema = small_schema()
    model = registry.build_model(name, schema, embedding_dim=D, attention_dim=3, dropout=0.1)
    assert ebc_of(model).embedding_bag_configs()[0].embedding_dim == D
    assert model(*inputs(schema)).shape == (B,)


def test_registry_rejects_an_unknown_name_listing_the_registered_ones() -> None:
    with pytest.raises(C2ALError, match=r"unknown model 'dlrm'; registered: afm, attention-fm, two-tower"):
        registry.build_model("dlrm", small_schema())


def test_registry_rejects_a_hyperparameter_no_model_takes() -> None:
    with pytest.raises(C2ALError, match=r"no registered model takes \['embeding_dim'\]"):
        registry.build_model("afm", small_schema(), embeding_dim=D)


def test_registry_gives_each_model_only_the_hyperparameters_it_names() -> None:
    afm = registry.build_model("afm", small_schema(), dropout=0.3, attention_dim=5)
    assert afm.inter_arch.dropout.p == 0.3 and afm.inter_arch.hidden[0].out_features == 5
    attention_fm = registry.build_model("attention-fm", small_schema(), dropout=0.3, attention_dim=5)
    assert attention_fm.inter_arch.K == 5  # attention_dim is AttentionFM's rank K'
    assert isinstance(registry.build_model("two-tower", small_schema(), dropout=0.3, attention_dim=5), TwoTower)


def test_register_model_refuses_a_taken_name() -> None:
    with pytest.raises(C2ALError, match="'afm' is already registered"):
        registry.register_model("afm")(lambda schema: nn.Linear(1, 1))


def test_registered_model_is_built_by_name() -> None:
    @registry.register_model("test-linear")
    def _linear(schema: Schema, embedding_dim: int = 2) -> nn.Module:
        return nn.Linear(len(schema.dense), embedding_dim)

    try:
        assert registry.build_model("test-linear", small_schema(3), embedding_dim=5).out_features == 5
    finally:
        del registry._SPECS["test-linear"]


def test_two_tower_without_user_and_item_sides_is_refused_by_the_registry() -> None:
    schema = Schema(sparse=(SparseFeature("a", 5), SparseFeature("b", 5)), name="flat")
    with pytest.raises(C2ALError, match=r"two-tower needs user-side and item-side.*--user-col and --item-col"):
        registry.build_model("two-tower", schema)


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_config_build_equals_the_registry_build_with_the_same_seed(name: str) -> None:
    from c2al.config import Config
    from c2al.train.build import seeded_model

    cfg = Config(model=name, embedding_dim=D, attention_dim=3, dropout=0.1, seed=7)
    torch.manual_seed(7)
    expected = registry.build_model(name, small_schema(), embedding_dim=D, attention_dim=3, dropout=0.1).state_dict()
    got = seeded_model(cfg, small_schema()).state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_config_build_rejects_an_unknown_model_flag() -> None:
    from c2al.config import Config
    from c2al.train.build import build_model

    with pytest.raises(C2ALError, match=r"unknown --model 'dlrm'"):
        build_model(Config(model="dlrm"), small_schema())


# ---------------------------------------------------------------- maths


def test_afm_attention_weights_sum_to_one_over_pairs() -> None:
    torch.manual_seed(0)
    schema = small_schema()
    model = build("afm", schema)
    w = model.attention_weights(*inputs(schema))
    assert w.shape == (B, 6)  # 4 fields (3 sparse + dense) -> 6 pairs
    torch.testing.assert_close(w.sum(-1), torch.ones(B))


def test_afm_inter_arch_equals_naive_double_loop() -> None:
    torch.manual_seed(0)
    arch = AFMInteractionArch(num_fields=4, embedding_dim=3, attention_dim=5).double()
    x = torch.randn(2, 4, 3, dtype=torch.double)
    lin, h = arch.hidden[0], arch.score
    expected = []
    for b in range(2):
        products, scores = [], []
        for i in range(4):
            for j in range(i + 1, 4):
                p = x[b, i] * x[b, j]
                products.append(p)
                scores.append(h(torch.relu(lin(p))).squeeze())
        a = torch.softmax(torch.stack(scores), 0)
        expected.append(sum(a[k] * products[k] for k in range(len(products))))
    torch.testing.assert_close(arch(x), torch.stack(expected), rtol=0, atol=1e-12)


def test_attention_fm_columns_of_y_sum_to_one_over_fields() -> None:
    torch.manual_seed(0)
    schema = small_schema()
    y = build("attention_fm", schema).attention_weights(*inputs(schema))
    assert y.shape == (B, 4, 3)
    torch.testing.assert_close(y.sum(1), torch.ones(B, 3))


def test_attention_fm_factored_product_equals_naive_gram_form() -> None:
    torch.manual_seed(0)
    arch = AttentionFMInteractionArch(num_fields=5, embedding_dim=3, rank=2, attention_hidden=7).double()
    x = torch.randn(4, 5, 3, dtype=torch.double)
    naive = (x @ x.transpose(1, 2)) @ arch.attention(x)  # (X X^T) Y, [B, F, K]
    torch.testing.assert_close(arch(x), naive.flatten(1), rtol=0, atol=1e-12)


def test_two_tower_forward_equals_sum_of_query_times_candidate() -> None:
    torch.manual_seed(0)
    schema = small_schema()
    model = build("two_tower", schema)
    dense, kjt = inputs(schema)
    expected = (model.query(dense, kjt) * model.candidate(kjt)).sum(-1)
    torch.testing.assert_close(model(dense, kjt), expected)


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_the_embedding_tables(name: str) -> None:
    torch.manual_seed(0)
    schema = small_schema()
    model = build(name, schema)
    dense, kjt = inputs(schema)
    bce_with_logits(model(dense, kjt), torch.tensor([1.0, 0, 1, 0, 1, 0])).backward()
    ebc = ebc_of(model)
    used = "abc" if name != "two_tower" else "ab"  # the context field feeds no tower
    for f in used:
        grad = ebc.embedding_bags[f"t_{f}"].weight.grad
        assert grad is not None and grad.abs().sum() > 0, f


# ---------------------------------------------------------------- training


def planted_batch(schema: Schema, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    """Label = 1 when a and b have the same parity: a pure a x b interaction, rank 1."""
    kjt = random_kjt(schema, batch, gen)
    ids = kjt.to_dict()
    labels = (ids["a"].values() % 2 == ids["b"].values() % 2).float()
    return torch.randn(batch, len(schema.dense), generator=gen), kjt, labels


@pytest.mark.parametrize("name", MODELS)
def test_model_learns_a_planted_interaction(name: str) -> None:
    torch.manual_seed(0)
    schema = small_schema()
    model = build(name, schema)
    gen = torch.Generator().manual_seed(1)
    eval_batch = planted_batch(schema, 512, gen)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(bce_with_logits(model(*eval_batch[:2]), eval_batch[2]))

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        dense, kjt, labels = planted_batch(schema, 64, gen)
        opt.zero_grad()
        bce_with_logits(model(dense, kjt), labels).backward()
        opt.step()
    after = eval_loss()
    assert before > 0.6 and after < 0.2, (before, after)


# ---------------------------------------------------------------- losses


def test_bce_matches_hand_computed_value() -> None:
    logits, labels = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert float(bce_with_logits(logits, labels)) == pytest.approx(expected, rel=1e-6)


def test_bce_ignores_rows_of_weight_zero() -> None:
    logits, labels = torch.tensor([0.0, 2.0, -5.0]), torch.tensor([1.0, 0.0, 1.0])
    weighted = bce_with_logits(logits, labels, torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(weighted, bce_with_logits(logits[:2], labels[:2]))


def test_bce_with_all_weights_zero_is_zero_with_grad() -> None:
    logits = torch.tensor([0.3, -0.2], requires_grad=True)
    loss = bce_with_logits(logits, torch.tensor([1.0, 0.0]), torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(2))


def test_bce_rejects_mismatched_shapes_naming_them() -> None:
    with pytest.raises(C2ALError, match=r"logits have shape \(3,\), labels \(2,\)"):
        bce_with_logits(torch.zeros(3), torch.zeros(2))


def test_in_batch_softmax_loss_equals_hand_computed_3x3() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    labels = torch.tensor([1.0, 0.0, 1.0])
    # Raw dot products q @ c^T: row 0 = [2, 0, 1], row 2 = [2, 1, 0]; positives are rows 0 and 2.
    row0 = -2 + math.log(math.exp(2) + 1 + math.exp(1))
    row2 = -0 + math.log(math.exp(2) + math.exp(1) + 1)
    loss = in_batch_softmax_loss(q, c, labels, temperature=1.0, normalize=False)
    assert float(loss) == pytest.approx((row0 + row2) / 2, rel=1e-6)


def test_in_batch_softmax_loss_normalizes_to_cosine_by_default() -> None:
    q = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    c = torch.tensor([[0.2, 0.0], [0.0, 7.0]])
    # Cosines are the identity, so with temperature 0.5 each row's logits are [2, 0].
    expected = -2 + math.log(math.exp(2) + 1)
    loss = in_batch_softmax_loss(q, c, torch.ones(2), temperature=0.5)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_in_batch_softmax_loss_without_positives_is_zero_with_grad() -> None:
    q = torch.randn(3, 2, requires_grad=True)
    loss = in_batch_softmax_loss(q, torch.randn(3, 2), torch.zeros(3))
    loss.backward()
    assert loss.item() == 0.0 and q.grad is not None and torch.equal(q.grad, torch.zeros(3, 2))


def test_in_batch_softmax_loss_drops_padding_rows_as_negatives() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    padded = in_batch_softmax_loss(q, c, torch.ones(3), 1.0, normalize=False, weights=torch.tensor([1.0, 1.0, 0.0]))
    trimmed = in_batch_softmax_loss(q[:2], c[:2], torch.ones(2), 1.0, normalize=False)
    torch.testing.assert_close(padded, trimmed)


def test_in_batch_softmax_loss_of_an_all_padding_batch_has_finite_grad() -> None:
    q = torch.randn(3, 2, requires_grad=True)
    loss = in_batch_softmax_loss(q, torch.randn(3, 2), torch.ones(3), weights=torch.zeros(3))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(q.grad).all()


class _LossWrapper(nn.Module):
    def forward(self, q: torch.Tensor, c: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return bce_with_logits((q * c).sum(-1), labels, weights) + in_batch_softmax_loss(q, c, labels, weights=weights)


def test_losses_are_fx_traceable_inside_a_train_wrapper() -> None:
    """TrainPipelineSparseDist traces the train wrapper's forward, loss included."""
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen), torch.tensor([1.0, 0, 1, 1]), torch.ones(4))
    traced = torch.fx.symbolic_trace(_LossWrapper())
    torch.testing.assert_close(traced(*args), _LossWrapper()(*args))


@pytest.mark.parametrize("name", MODELS)
def test_inter_arch_traces_with_fx_to_the_same_output(name: str) -> None:
    """c2al's plugin traces through the shared-representation module inside TorchRec's pipeline."""
    torch.manual_seed(0)
    model = build(name, small_schema())
    arch = model.inter_arch
    args = (torch.randn(B, 8), torch.randn(B, 8)) if name == "two_tower" else (torch.randn(B, 4, D),)
    torch.testing.assert_close(torch.fx.symbolic_trace(arch)(*args), arch(*args))
