"""`ctm.discriminator=projected` (ctmkit/nets/projected.py, feature_nets.py; docs/method.md section 3): random
projections and multi-scale heads over frozen feature networks, tested with small stand-in extractors (no real
weights exist here); the timm-built reference networks when timm can be imported; the refusals without weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ctmkit.errors import UserError
from ctmkit.nets.augment import diff_augment
from ctmkit.nets.feature_nets import DEIT_WEIGHTS, EFFNET_WEIGHTS, import_timm, reference_feature_nets
from ctmkit.nets.projected import FeatureNet, PatchHead, ProjectedDiscriminator, RandomProjection


class StandIn(nn.Module):
    """A small frozen multi-scale extractor: 4 stride-2 convs, maps at size/2, /4, /8, /16."""

    def __init__(self, channels=(8, 16, 16, 32)) -> None:
        super().__init__()
        c = (3, *channels)
        self.convs = nn.ModuleList(nn.Conv2d(c[i], c[i + 1], 3, 2, 1) for i in range(4))

    def forward(self, x):
        out = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            out.append(x)
        return out


def stand_ins(seed: int = 0, sizes: tuple[int, int] = (32, 64)) -> list[FeatureNet]:
    """Two stand-ins for the reference's two networks, with their two input normalisations."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [FeatureNet("cnn", StandIn().requires_grad_(False), (0.5,) * 3, (0.5,) * 3, sizes[0]),
                FeatureNet("vit", StandIn((4, 8, 8, 16)).requires_grad_(False), (0.485, 0.456, 0.406),
                           (0.229, 0.224, 0.225), sizes[1])]


def test_random_projection_mixes_channels_and_scales() -> None:
    proj = RandomProjection([24, 40, 112, 320])        # tf_efficientnet_lite0's channels
    maps = [torch.randn(2, c, r, r) for c, r in zip([24, 40, 112, 320], [56, 28, 14, 7])]
    out = proj(maps)
    assert [tuple(m.shape[1:]) for m in out] == [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14)]
    assert proj.channels == [64, 64, 128, 256]
    maps[3] = maps[3] + 1.0                               # the coarsest level reaches every output (CSM)
    assert all(not torch.allclose(a, b) for a, b in zip(out, proj(maps)))


@pytest.mark.parametrize("res, logits", [(112, 16), (56, 16), (28, 16), (14, 16), (32, 25), (8, 25), (4, 1)])
def test_patch_heads_follow_projected_gans_plan(res: int, logits: int) -> None:
    """The reference's 224-pixel maps (112 .. 14) all end in 4 x 4 logits; 8-pixel maps give 5 x 5."""
    head = PatchHead(16, res, ndf=8)
    assert head(torch.randn(2, 16, res, res)).shape == (2, logits)
    downs = sum(isinstance(m, nn.BatchNorm2d) for m in head.modules())
    assert downs == {112: 4, 56: 3, 28: 2, 14: 1}.get(res, downs)
    with pytest.raises(ValueError, match="too small"):
        PatchHead(16, 2)


def test_reference_head_widths() -> None:
    """Without ndf the head widths are Projected GAN's: 128 -> 64 -> 32 -> 16 -> 8 with 64, 128, 256, 512."""
    head = PatchHead(64, 112)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]


def test_projected_discriminator_shapes_and_state() -> None:
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(stand_ins(), seed=3, ndf=8)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    # cnn: maps 16, 8, 4, 2 -> projected 32, 16, 8, 4 -> 25 + 25 + 25 + 1 logits; vit (64-pixel input): 4 x 25
    assert disc(x).shape == (4, 76 + 100)
    assert disc(x[:, :1]).shape == (4, 176)                                  # gray images are repeated to RGB
    assert set(disc.state_dict()) == {k for k in disc.state_dict() if k.startswith("heads.")}   # heads only
    names = {n.split(".")[1] for n in disc.state_dict()}
    assert names == {"cnn", "vit"}
    with pytest.raises(ValueError, match="divisible by 3"):
        disc(x, groups=3)


def test_gradients_flow_only_into_the_heads() -> None:
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(stand_ins(), seed=0, ndf=8)
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    disc(x, groups=2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0                       # to the generator's images
    heads = dict(disc.named_parameters())
    assert heads and all(n.startswith("heads.") and p.grad is not None and p.grad.abs().sum() > 0
                         for n, p in heads.items())
    frozen = [p for m in disc.frozen for p in m.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    disc.requires_grad_(False)                                                 # what the generator step does
    assert all(not p.requires_grad for p in disc.parameters())
    disc.requires_grad_(True)
    assert all(not p.requires_grad for p in frozen)                            # the frozen parts stay frozen


def test_projections_are_fixed_by_the_seed_and_leave_the_random_stream_alone() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = ProjectedDiscriminator(stand_ins(), seed=1, ndf=8)
    assert torch.equal(torch.get_rng_state(), before)
    b = ProjectedDiscriminator(stand_ins(), seed=1, ndf=8)
    c = ProjectedDiscriminator(stand_ins(), seed=2, ndf=8)
    same = [torch.equal(p, q) for m, n in zip(a.frozen, b.frozen) for p, q in zip(m.parameters(), n.parameters())]
    assert all(same)
    assert not torch.equal(a.frozen[0][1].ccm[0].weight, c.frozen[0][1].ccm[0].weight)


def test_groups_keep_batchnorm_statistics_apart() -> None:
    """groups=2 gives each half exactly what a call on that half alone gives (the reference's separate calls)."""
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(stand_ins(), seed=0, ndf=8)
    real, fake = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    d1, d2, d3 = (copy.deepcopy(disc) for _ in range(3))     # each from the same spectral-norm state
    with torch.no_grad():
        both = d1(torch.cat([real, fake]), groups=2)
        apart = torch.cat([d2(real), d2(fake)])
        mixed = d3(torch.cat([real, fake]))
    assert torch.allclose(both, apart, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both, mixed, rtol=1e-3, atol=1e-4)


def test_augmentation_is_drawn_per_feature_network() -> None:
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(stand_ins(), seed=0, ndf=8).eval()     # eval: BatchNorm and spectral norm fixed
    seen = []

    def augment(x):
        seen.append(diff_augment(x, gen, cutout_ratio=0.2))
        return seen[-1]

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    out = disc(x, augment=augment)
    assert len(seen) == 2 and out.shape == (2, 176) and not torch.equal(seen[0], seen[1])   # a draw per network
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(disc(x, augment=augment), out)
    assert not torch.allclose(disc(x), out)


def test_reference_networks_refuse_without_weights(tmp_path) -> None:
    with pytest.raises(UserError) as e:
        reference_feature_nets("", "")
    msg = str(e.value)
    assert "\n" not in msg and "ctm.disc_deit is not set" in msg and "deit_base_distilled_patch16_224" in msg
    assert "huggingface.co/timm/deit_base_distilled_patch16_224.fb_in1k" in msg and "downloads nothing" in msg
    deit = tmp_path / "deit.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 768)}}, deit)
    with pytest.raises(UserError, match="ctm.disc_effnet: 'eff.pth' is not a file.*tf_efficientnet_lite0"):
        reference_feature_nets(str(deit), "eff.pth")
    assert "tf_efficientnet_lite0-0aa007d2.pth" in EFFNET_WEIGHTS.needed
    assert "deit_base_distilled_patch16_224-df68dfff.pth" in DEIT_WEIGHTS.needed


def _timm_or_skip():
    try:
        return import_timm()
    except UserError as e:
        pytest.skip(str(e))


def test_without_timm_the_error_says_what_to_install(monkeypatch) -> None:
    import builtins
    real = builtins.__import__

    def no_timm(name, *a, **k):
        if name == "timm":
            raise ModuleNotFoundError("No module named 'torchvision'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(UserError, match="pip install 'timm>=1.0' and the torchvision build"):
        import_timm()


def _reference_nets(tmp_path):
    timm = _timm_or_skip()
    from safetensors.torch import save_file
    torch.manual_seed(1)
    vit = timm.create_model("deit_base_distilled_patch16_224")
    eff = timm.create_model("tf_efficientnet_lite0")
    torch.save({"model": vit.state_dict()}, tmp_path / "deit.pth")                       # Facebook's layout
    save_file({k: v.contiguous() for k, v in eff.state_dict().items()}, str(tmp_path / "eff.safetensors"))
    return reference_feature_nets(str(tmp_path / "deit.pth"), str(tmp_path / "eff.safetensors"), seed=0), vit


@pytest.mark.slow
def test_reference_networks_through_timm(tmp_path) -> None:
    """deit_base (86M parameters) and tf_efficientnet_lite0 from random-weight files: the reference's map layout,
    64 logits per network, gradients into the heads only. Slow on a CPU (a DeiT-base forward pass at 224)."""
    nets, vit = _reference_nets(tmp_path)
    assert torch.equal(nets[0].net.vit.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)
    with torch.no_grad():
        shapes = [[tuple(m.shape[1:]) for m in fn.net(torch.zeros(1, 3, 224, 224))] for fn in nets]
    assert shapes == [[(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)],
                      [(24, 56, 56), (40, 28, 28), (112, 14, 14), (320, 7, 7)]]
    disc = ProjectedDiscriminator(nets, seed=0)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    out = disc(x, groups=2)
    assert out.shape == (2, 128)
    out.mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for m in disc.frozen for p in m.parameters())
