"""Contract tests for the CTM image backbone (ctmkit.nets.unet) and the time embeddings."""

from __future__ import annotations

import pytest
import torch

from ctmkit.nets.embed import FourierEmbedding, TimeEmbedding
from ctmkit.nets.unet import UNet


def _tiny(c: int, res: int, num_classes: int = 0) -> UNet:
    torch.manual_seed(0)
    return UNet(c, res, model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                attn_resolutions=(res // 2,), num_classes=num_classes, emb_mult=2)


def _inputs(c: int, res: int, b: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, c, res, res, generator=g)
    t = torch.rand(b, generator=g) * 2.7 - 1.6
    s = torch.rand(b, generator=g) * 2.7 - 1.6
    return x, t, s


def _make_output_visible(model: UNet) -> None:
    with torch.no_grad():
        model.conv_out.weight.normal_(0.0, 0.1)


def test_fourier_embedding_identical_instances_and_shape() -> None:
    a, b = FourierEmbedding(32), FourierEmbedding(32)
    assert torch.equal(a.freqs, b.freqs)
    out = a(torch.linspace(-1.6, 1.1, 5))
    assert out.shape == (5, 32)
    assert torch.allclose(out[:, :16] ** 2 + out[:, 16:] ** 2, torch.ones(5, 16), atol=1e-5)


def test_time_embedding_zero_out() -> None:
    emb = TimeEmbedding(16, zero_out=True)
    assert torch.equal(emb(torch.randn(3)), torch.zeros(3, 16))
    assert TimeEmbedding(16)(torch.randn(3)).abs().sum() > 0


@pytest.mark.parametrize("c,res", [(1, 8), (1, 28), (3, 32)])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("with_s", [False, True])
def test_output_shape(c: int, res: int, with_labels: bool, with_s: bool) -> None:
    model = _tiny(c, res, num_classes=10 if with_labels else 0)
    x, t, s = _inputs(c, res)
    labels = torch.tensor([3, 7]) if with_labels else None
    out = model(x, t, s if with_s else None, labels)
    assert out.shape == x.shape


def test_odd_sizes_and_deep_levels() -> None:
    torch.manual_seed(0)
    model = UNet(1, 28, model_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(7,))
    x, t, _ = _inputs(1, 28)
    assert model(x, t).shape == x.shape  # 28 -> 14 -> 7 -> 4 and back


def test_last_layer_is_a_parameter() -> None:
    model = _tiny(1, 8)
    assert any(p is model.last_layer() for p in model.parameters())


def test_s_embedding_starts_without_effect() -> None:
    model = _tiny(1, 8)
    _make_output_visible(model)
    x, t, s = _inputs(1, 8)
    with torch.no_grad():
        base = model(x, t)
        assert torch.equal(model(x, t, s), base)
        model.s_embed.fc2.weight.normal_(0.0, 0.1)
        assert not torch.allclose(model(x, t, s), base)


def test_gradients_reach_all_parameters() -> None:
    model = _tiny(3, 8, num_classes=4)
    _make_output_visible(model)
    x, t, s = _inputs(3, 8)
    model(x, t, s, torch.tensor([0, 2])).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert model.last_layer().grad.abs().sum() > 0


def test_labels_change_output() -> None:
    model = _tiny(1, 8, num_classes=4)
    _make_output_visible(model)
    x, t, s = _inputs(1, 8)
    with torch.no_grad():
        a = model(x, t, s, torch.tensor([0, 0]))
        b = model(x, t, s, torch.tensor([1, 1]))
        null = model(x, t, s, torch.tensor([-1, -1]))             # the null label: no class embedding
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, null)
    with pytest.raises(ValueError, match="conditioned on 4 classes"):
        model(x, t, s)


def test_cifar_sized_parameter_count() -> None:
    model = UNet(3, 32, model_channels=128, channel_mult=(2, 2, 2), num_res_blocks=4,
                 attn_resolutions=(16,), num_classes=0)
    n = sum(p.numel() for p in model.parameters())
    assert 45e6 < n < 70e6
