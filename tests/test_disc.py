"""Contract tests for the GAN discriminators and DiffAugment (ctmkit.nets.disc, ctmkit.nets.augment)."""

from __future__ import annotations

import pytest
import torch

from ctmkit.nets.augment import diff_augment
from ctmkit.nets.disc import ImageDiscriminator, VectorDiscriminator


@pytest.mark.parametrize("num_classes", [0, 5])
def test_vector_discriminator(num_classes: int) -> None:
    torch.manual_seed(0)
    disc = VectorDiscriminator(3, hidden=16, depth=2, num_classes=num_classes)
    x = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 4]) if num_classes else None
    out = disc(x, labels)
    assert out.shape == (4,)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_vector_discriminator_labels_matter_and_spectral() -> None:
    torch.manual_seed(0)
    disc = VectorDiscriminator(2, hidden=8, num_classes=3, spectral=True)
    x = torch.randn(3, 2)
    assert not torch.allclose(disc(x, torch.tensor([0, 0, 0])), disc(x, torch.tensor([1, 1, 1])))


@pytest.mark.parametrize("c,res", [(1, 8), (1, 28), (3, 32), (3, 64)])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_image_discriminator(c: int, res: int, num_classes: int) -> None:
    torch.manual_seed(0)
    disc = ImageDiscriminator(c, res, channels=8, num_classes=num_classes)
    x = torch.randn(2, c, res, res, requires_grad=True)
    labels = torch.tensor([1, 9]) if num_classes else None
    out = disc(x, labels)
    assert out.shape == (2,)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("c,res", [(1, 8), (3, 32)])
def test_diff_augment_shape_determinism_and_grad(c: int, res: int) -> None:
    x = torch.randn(4, c, res, res, requires_grad=True)
    a = diff_augment(x, _gen(0))
    assert a.shape == x.shape
    assert torch.equal(a, diff_augment(x, _gen(0)))
    assert not torch.equal(a, diff_augment(x, _gen(1)))
    a.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", ""])
def test_diff_augment_single_policies(policy: str) -> None:
    x = torch.randn(3, 3, 16, 16)
    out = diff_augment(x, _gen(2), policy=policy)
    assert out.shape == x.shape
    if policy == "":
        assert torch.equal(out, x)
    if policy == "cutout":
        assert ((out == 0) & (x != 0)).any()


def test_diff_augment_translation_moves_pixels() -> None:
    x = torch.arange(64.0).reshape(1, 1, 8, 8).repeat(16, 1, 1, 1)
    out = diff_augment(x, _gen(3), policy="translation")
    assert any(not torch.equal(out[i], x[i]) for i in range(16))
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_diff_augment_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown DiffAugment policy"):
        diff_augment(torch.zeros(1, 1, 4, 4), policy="color,rotate")


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_diff_augment_cutout_ratio_sets_the_square(ratio: float) -> None:
    x = torch.ones(64, 1, 40, 40)
    out = diff_augment(x, torch.Generator().manual_seed(0), policy="cutout", cutout_ratio=ratio)
    zeroed = (out == 0).float().mean().item()
    # a square of side ratio x size, centred uniformly, clipped at the edges: mean overlap per axis r - r^2 / 4
    assert zeroed == pytest.approx((ratio - ratio**2 / 4) ** 2, rel=0.1)


def test_alternating_generator_and_discriminator_steps(tmp_path) -> None:
    """ctm.g_every=2 (the reference's alternation): the student moves on even steps, the discriminator on odd."""
    from ctmkit.config import DistillConfig, load_config
    from ctmkit.data import load_data
    from ctmkit.train.ctm import CTMRun
    cfg = load_config(DistillConfig, None, None, ["model.hidden=16", "model.depth=1", "model.emb_dim=16",
                                                  "ctm.gan_start=0", "ctm.g_every=2"],
                      data="ring", teacher="exact", **{"train.steps": 4, "train.batch_size": 16})
    run = CTMRun(cfg, tmp_path / "ctm", load_data("ring"))
    moved = []
    for step in range(4):
        run.step = step
        g0 = [p.detach().clone() for p in run.net.parameters()]
        d0 = [p.detach().clone() for p in run.disc.parameters()]
        stats = run.train_step()
        assert stats["_ok"]
        moved.append((any(not torch.equal(a, b) for a, b in zip(g0, run.net.parameters())),
                      any(not torch.equal(a, b) for a, b in zip(d0, run.disc.parameters()))))
        assert ("loss_ctm" in stats) == (step % 2 == 0) and ("loss_d" in stats) == (step % 2 == 1)
    assert moved == [(True, False), (False, True), (True, False), (False, True)]
