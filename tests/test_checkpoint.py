"""Checkpoints: atomic, pickle-free, sharding-independent, config-checked."""
import os

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from c2al.dist.checkpoint import atomic_torch_save, gather_full, load_checkpoint, restore, save_checkpoint
from c2al.dist.process import init_distributed
from c2al.dist.sharding import dense_optimizer, shard
from c2al.errors import C2ALError


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=4, num_embeddings=10, feature_names=[k]) for k in "ab"]
        )
        self.lin = nn.Linear(8, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.lin(self.ebc(kjt).values()).squeeze(-1)


def kjt() -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1]))


def trained_tiny(seed: int, steps: int):
    torch.manual_seed(seed)
    model = shard(Tiny(), init_distributed())
    opt = dense_optimizer(model, lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(kjt()).pow(2).sum().backward()
        opt.step()
    return model, opt


def test_restore_reproduces_outputs_and_optimizer_state(tmp_path):
    model, opt = trained_tiny(0, steps=3)
    save_checkpoint(tmp_path / "c.pt", model_state=model.state_dict(), optimizer_state=opt.state_dict(), config={"a": 1}, step=3)
    other, other_opt = trained_tiny(1, steps=0)
    restore(other, other_opt, load_checkpoint(tmp_path / "c.pt"))
    assert torch.equal(other(kjt()), model(kjt()))
    # one more identical step on both keeps them identical: optimizer state came back too
    for m, o in ((model, opt), (other, other_opt)):
        o.zero_grad()
        m(kjt()).pow(2).sum().backward()
        o.step()
    assert torch.allclose(other(kjt()), model(kjt()), atol=1e-6)


def test_checkpoint_holds_only_plain_tensors(tmp_path):
    model, opt = trained_tiny(0, steps=1)
    save_checkpoint(tmp_path / "c.pt", model_state=model.state_dict(), optimizer_state=opt.state_dict(), config={}, step=1)
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    assert type(payload["model"]["ebc.embedding_bags.t_a.weight"]) is torch.Tensor


def test_checkpoint_from_other_config_names_the_field(tmp_path):
    model, _ = trained_tiny(0, steps=0)
    save_checkpoint(tmp_path / "c.pt", model_state=model.state_dict(), config={"model": "afm", "embedding_dim": 16}, step=0)
    with pytest.raises(C2ALError, match="embedding_dim=16"):
        load_checkpoint(tmp_path / "c.pt", expect_config={"model": "afm", "embedding_dim": 8}, keys=("model", "embedding_dim"))


def test_checkpoint_with_other_shapes_names_the_entry(tmp_path):
    model, _ = trained_tiny(0, steps=0)
    state = gather_full(model.state_dict())
    state["lin.weight"] = torch.zeros(1, 3)
    save_checkpoint(tmp_path / "c.pt", model_state=state, config={}, step=0)
    with pytest.raises(C2ALError, match="lin.weight"):
        restore(model, None, load_checkpoint(tmp_path / "c.pt"))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"format": "c2al-checkpoint-v1", "evil": os.system}, tmp_path / "c.pt")
    with pytest.raises(C2ALError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "c.pt")


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(C2ALError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    atomic_torch_save({"v": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"v": lambda: 0}, path)  # not serializable: fails mid-write
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
