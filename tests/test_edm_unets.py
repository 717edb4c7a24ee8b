"""Contract tests for ctmkit's EDM U-Nets (ctmkit.nets.edm_unets): shapes, the zero-initialised s path, labels,
EDM's parameter names, state-dict round trips. Only ctmkit code runs here."""

from __future__ import annotations

import pytest
import torch

from ctmkit.nets.dropout import set_dropout
from ctmkit.nets.edm_unets import DhariwalUNet, SongUNet

SONG = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1,
            attn_resolutions=(4,), dropout=0.0)
NCSN = dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1))
ADM = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_blocks=1,
           attn_resolutions=(4,), dropout=0.0)

VARIANTS = {
    "ddpmpp": (SongUNet, SONG),
    "ncsnpp": (SongUNet, {**SONG, **NCSN}),
    "song_skip_skip": (SongUNet, {**SONG, "encoder_type": "skip", "decoder_type": "skip"}),
    "song_res_skip_fourier": (SongUNet, {**SONG, **NCSN, "decoder_type": "skip", "augment_dim": 9}),
    "adm": (DhariwalUNet, ADM),
    "adm_aug": (DhariwalUNet, {**ADM, "augment_dim": 9}),
}


def _build(name: str, seed: int = 0, **over):
    cls, kw = VARIANTS[name]
    torch.manual_seed(seed)
    return cls(**{**kw, **over}).eval()


def _perturb(net: torch.nn.Module, seed: int = 1, skip_s: bool = True) -> None:
    """Random weights everywhere (so outputs are not trivially zero), the s path left at its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in net.named_parameters():
            if not (skip_s and k.startswith("s_")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _inputs(b: int = 3, c: int = 3, res: int = 8):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, c, res, res, generator=g), torch.randn(b, generator=g), torch.randn(b, generator=g)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("label_dim", [0, 10])
def test_shapes_and_the_s_path_starts_at_zero(name, label_dim):
    net = _build(name, label_dim=label_dim, out_channels=5)
    _perturb(net)
    x, t, s = _inputs()
    labels = torch.tensor([0, 3, 9]) if label_dim else None
    with torch.no_grad():
        out = net(x, t, None, labels)
        assert out.shape == (3, 5, 8, 8) and torch.isfinite(out).all() and out.abs().max() > 0
        assert torch.equal(net(x, t, s, labels), out)            # s_map_layer1 is zero: s changes nothing
        net.s_map_layer1.weight.normal_(0.0, 0.5)
        assert not torch.equal(net(x, t, s, labels), out)         # ... but the path is wired in
    assert net.num_classes == label_dim


def test_a_single_noise_value_is_broadcast_over_the_batch():
    net = _build("ncsnpp")
    _perturb(net)
    x, _, _ = _inputs()
    with torch.no_grad():
        assert torch.allclose(net(x, torch.tensor(0.3)), net(x, torch.full((3,), 0.3)))


@pytest.mark.parametrize("name", ["ddpmpp", "adm"])
def test_the_null_label_is_the_zero_class_vector_and_indices_are_one_hot(name):
    net = _build(name, label_dim=10)
    _perturb(net)
    x, t, _ = _inputs()
    labels, null = torch.tensor([1, 0, 7]), torch.full((3,), -1)
    with torch.no_grad():
        assert torch.equal(net(x, t, None, null), net(x, t, None, torch.zeros(3, 10)))
        assert torch.equal(net(x, t, None, labels), net(x, t, None, torch.eye(10)[labels]))
        assert not torch.equal(net(x, t, None, labels), net(x, t, None, null))
        mixed = torch.tensor([1, -1, 7])                          # per sample
        assert torch.equal(net(x, t, None, mixed), net(x, t, None, torch.eye(10)[[1, 0, 7]] * torch.tensor(
            [[1.0], [0.0], [1.0]])))
    with pytest.raises(ValueError, match="class vectors"):
        net(x, t, None, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="conditioned on 10 classes"):     # labels=None: refused, not guessed
        net(x, t)


def test_label_dropout_only_in_training_mode():
    net = _build("adm", label_dim=10, label_dropout=1.0)
    _perturb(net)
    x, t, _ = _inputs()
    labels = torch.tensor([1, 0, 7])
    with torch.no_grad():
        dropped = net.train()(x, t, None, labels)               # every label dropped: the zero class vector
        null = torch.full((3,), -1)
        assert torch.equal(dropped, net(x, t, None, null))
        assert not torch.equal(net.eval()(x, t, None, labels), net(x, t, None, null))


def test_edm_parameter_names():
    song = _build("ncsnpp", label_dim=10, augment_dim=9).state_dict()
    for key in ["map_noise.freqs", "map_label.weight", "map_label.bias", "map_augment.weight", "map_layer0.weight",
                "map_layer1.bias", "enc.8x8_conv.weight", "enc.4x4_down.conv0.resample_filter",
                "enc.4x4_down.skip.weight", "enc.4x4_aux_residual.weight", "enc.4x4_aux_residual.resample_filter",
                "enc.4x4_block0.norm0.weight", "enc.4x4_block0.affine.weight", "enc.4x4_block0.qkv.weight",
                "enc.4x4_block0.proj.bias", "dec.4x4_in0.norm2.weight", "dec.8x8_up.conv0.weight",
                "dec.8x8_block1.skip.weight", "dec.8x8_aux_norm.weight", "dec.8x8_aux_conv.weight",
                "s_map_noise.freqs", "s_map_layer0.weight", "s_map_layer1.weight", "s_map_layer1.bias"]:
        assert key in song, key
    assert "map_augment.bias" not in song and "dec.4x4_in1.qkv.weight" not in song
    assert song["enc.4x4_down.conv0.resample_filter"].shape == (1, 1, 4, 4)
    skip = _build("song_skip_skip").state_dict()
    assert {"enc.4x4_aux_down.resample_filter", "enc.4x4_aux_skip.weight", "dec.4x4_aux_conv.weight",
            "dec.8x8_aux_up.resample_filter"} <= set(skip)
    adm = _build("adm", label_dim=10, augment_dim=9).state_dict()
    for key in ["map_label.weight", "map_augment.weight", "enc.8x8_conv.weight", "enc.4x4_down.skip.resample_filter",
                "enc.4x4_block0.qkv.weight", "dec.4x4_in0.proj.weight", "dec.8x8_up.conv0.resample_filter",
                "out_norm.weight", "out_conv.weight", "out_conv.bias", "s_map_layer0.weight"]:
        assert key in adm, key
    assert "map_label.bias" not in adm and "enc.4x4_down.skip.weight" not in adm   # resampling-only skip
    assert adm["enc.4x4_block0.affine.weight"].shape == (2 * 64, 4 * 32)           # scale and shift
    assert not any("s_map_noise" in k for k in adm)                                # positional: no buffer


@pytest.mark.parametrize("name", ["ncsnpp", "song_skip_skip", "adm"])
def test_state_dict_round_trips_and_a_teacher_dict_loads_without_s(name):
    a = _build(name, seed=0, label_dim=10)
    _perturb(a, skip_s=False)
    b = _build(name, seed=5, label_dim=10)
    b.load_state_dict(a.state_dict(), strict=True)
    b.load_state_dict(b.state_dict(), strict=True)
    x, t, s = _inputs()
    labels = torch.tensor([2, 2, 4])
    with torch.no_grad():
        assert torch.equal(a(x, t, s, labels), b(x, t, s, labels))
    teacher = {k: v for k, v in a.state_dict().items() if not k.startswith("s_")}
    c = _build(name, seed=7, label_dim=10)
    res = c.load_state_dict(teacher, strict=False)
    assert not res.unexpected_keys and res.missing_keys and all(k.startswith("s_") for k in res.missing_keys)
    with torch.no_grad():
        assert torch.equal(c(x, t, None, labels), a(x, t, None, labels))
        assert torch.equal(c(x, t, s, labels), c(x, t, None, labels))


def test_last_layer_is_the_output_conv():
    song = _build("song_skip_skip")
    assert song.last_layer() is song.dec["8x8_aux_conv"].weight
    adm = _build("adm")
    assert adm.last_layer() is adm.out_conv.weight
    x, t, _ = _inputs()
    out = adm(x, t).square().sum()
    assert torch.autograd.grad(out, adm.last_layer())[0].shape == adm.out_conv.weight.shape


def test_lists_and_tuples_build_the_same_network():
    a = SongUNet(**{**SONG, **NCSN})
    b = SongUNet(**{**SONG, **NCSN, "channel_mult": [1, 2], "attn_resolutions": [4], "resample_filter": [1, 3, 3, 1]})
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(**{**SONG, "encoder_type": "fancy"})


def test_block_dropout_follows_training_mode_unless_forced():
    net = _build("ddpmpp", dropout=0.5)
    _perturb(net)
    x, t, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t))                  # eval: deterministic
        set_dropout(net, True)                                    # ctm.target_dropout reaches these blocks
        assert not torch.equal(net(x, t), net(x, t))              # forced on in eval mode
