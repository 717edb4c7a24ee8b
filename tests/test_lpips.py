"""`ctm.distance=lpips` (ctmkit/nets/lpips.py, docs/method.md section 3): the shipped LPIPS heads equal the `lpips`
wheel's, the VGG16 stack takes torchvision's names, the distance's properties on random VGG16 weights (no real ones
exist here), and the refusals when the weight file is not there."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctmkit.errors import UserError
from ctmkit.nets.lpips import HEADS_FILE, LPIPS, TAPS, lpips_heads, vgg16_features

# lpips 0.1.4 (PyPI), lpips/weights/v0.1/vgg.pth, read with torch.load(weights_only=True): per tensor its shape,
# the SHA-256 of its float32 bytes, and its first and last values (float.hex).
WHEEL_HEADS = {
    "lin0.model.1.weight": ((1, 64, 1, 1), "b4ee423bb7c8ef01a0198639747b33583380b4cf8a087ef48bc081cbab036a96",
                            "0x1.9a83c40000000p-5", "0x1.1a50dc0000000p-5"),
    "lin1.model.1.weight": ((1, 128, 1, 1), "7fd9e5e5d8d68cc0b8fa2828099bae7753bd9376c9b40607ddf520f0c24d565d",
                            "0x1.42d7720000000p-5", "0x1.25c8b60000000p-4"),
    "lin2.model.1.weight": ((1, 256, 1, 1), "63d06a086d0592f7cbb32ccfa9c0cd8b89c53798f5985e986b2048625e214ad9",
                            "0x1.da981e0000000p-5", "0x1.05521e0000000p-4"),
    "lin3.model.1.weight": ((1, 512, 1, 1), "16246e8056f57bc5539c47ef5406d343cfa17575f70508e7b577b51056f7be66",
                            "0x1.d990300000000p-5", "0x1.ff12820000000p-5"),
    "lin4.model.1.weight": ((1, 512, 1, 1), "3735a0ea893525bde6544cab01a0525bee073f64819d7a0feb7ad37a6965052d",
                            "0x1.5da34c0000000p-5", "0x1.dda4980000000p-5"),
}
WHEEL = Path("/tmp/wheels/lpips-0.1.4-py3-none-any.whl")
CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)      # conv indices of torchvision's vgg16().features


def random_vgg_file(path: Path, seed: int = 0) -> Path:
    """A torchvision-style VGG16 state dict with random weights (and the classifier keys a real file has)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sd = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(sd, path)
    return path


def test_shipped_heads_are_the_lpips_wheel_values_bit_for_bit() -> None:
    sd = load_file(str(HEADS_FILE))
    assert set(sd) == set(WHEEL_HEADS)
    for key, (shape, digest, first, last) in WHEEL_HEADS.items():
        t = sd[key]
        assert t.dtype == torch.float32 and tuple(t.shape) == shape
        assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == digest
        assert (t.flatten()[0].item().hex(), t.flatten()[-1].item().hex()) == (first, last)
        assert bool((t >= 0).all())                                  # LPIPS heads are non-negative
    assert [tuple(w.shape) for w in lpips_heads()] == [v[0] for v in WHEEL_HEADS.values()]
    notice = (HEADS_FILE.parent / "NOTICE").read_text()
    assert "Redistribution and use in source and binary forms" in notice and "Richard Zhang" in notice


@pytest.mark.skipif(not WHEEL.is_file(), reason="the lpips wheel is not in /tmp/wheels")
def test_shipped_heads_equal_the_wheel_file() -> None:
    with zipfile.ZipFile(WHEEL) as z:
        wheel = torch.load(io.BytesIO(z.read("lpips/weights/v0.1/vgg.pth")), map_location="cpu", weights_only=True)
    shipped = load_file(str(HEADS_FILE))
    assert set(wheel) == set(shipped)
    assert all(torch.equal(wheel[k], shipped[k]) for k in wheel)


def test_the_heads_ship_as_package_data() -> None:
    toml = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"nets/weights/*.safetensors"' in toml and '"nets/weights/NOTICE"' in toml


def test_vgg16_stack_has_torchvision_names_and_average_pooling() -> None:
    feats = vgg16_features()
    sd = feats.state_dict()
    assert set(sd) == {f"{i}.{p}" for i in CONVS for p in ("weight", "bias")}
    assert tuple(sd["0.weight"].shape) == (64, 3, 3, 3) and tuple(sd["28.weight"].shape) == (512, 512, 3, 3)
    assert [i for i, m in enumerate(feats) if isinstance(m, torch.nn.AvgPool2d)] == [4, 9, 16, 23]
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in feats)
    assert all(isinstance(feats[i], torch.nn.ReLU) for i in TAPS) and len(feats) == 30


@pytest.fixture(scope="module")
def lpips(tmp_path_factory) -> LPIPS:
    return LPIPS.from_file(str(random_vgg_file(tmp_path_factory.mktemp("vgg") / "vgg16.pth")), size=32)


def test_lpips_is_a_distance_on_random_weights(lpips: LPIPS) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    assert lpips(a, a).shape == (4,) and torch.equal(lpips(a, a), torch.zeros(4))          # exactly zero
    d = lpips(a, b)
    assert bool((d > 0).all()) and torch.allclose(d, lpips(b, a), rtol=1e-6, atol=0)       # symmetric, positive
    c = (a + 0.5 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    assert not torch.allclose(lpips(a, c), d)                                               # moves with the input
    gray = torch.rand(2, 1, 8, 8, generator=g)
    assert torch.equal(lpips(gray, gray.clone()), torch.zeros(2))
    assert torch.allclose(lpips(gray, -gray), lpips(gray.expand(-1, 3, -1, -1), -gray.expand(-1, 3, -1, -1)))


def test_lpips_gradients_reach_the_images_not_the_network(lpips: LPIPS) -> None:
    a = torch.rand(2, 3, 8, 8) * 2 - 1
    b = (torch.rand(2, 3, 8, 8) * 2 - 1).requires_grad_(True)
    lpips(a, b).sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips.parameters())
    assert set(lpips.state_dict()) == {f"features.{i}.{p}" for i in CONVS for p in ("weight", "bias")}


def test_lpips_input_follows_the_reference(lpips: LPIPS) -> None:
    """Below 256 pixels: bilinear resize to `size`; then (x + 1) / 2 with ImageNet's mean and std (piq)."""
    x = torch.full((1, 3, 8, 8), 0.2)
    p = lpips.prepare(x)
    assert p.shape == (1, 3, 32, 32)
    want = (torch.tensor([0.6, 0.6, 0.6]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(p[0, :, 0, 0], want, rtol=0, atol=1e-6)


def test_lpips_matches_its_formula(lpips: LPIPS) -> None:
    """sum over the 5 taps of the spatial mean of sum_c w_c (unit(f(a)) - unit(f(b)))^2, computed here apart."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    acts = []
    for x in (a, b):
        h, out = lpips.prepare(x), []
        for i, layer in enumerate(lpips.features):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        acts.append(out)
    heads = lpips_heads()
    want = sum((w[0, :, 0, 0, None, None] * (x - y) ** 2).sum(1).mean((1, 2)) for x, y, w in zip(*acts, heads))
    assert torch.allclose(lpips(a, b), want, rtol=1e-5, atol=0)


def test_a_missing_vgg16_file_is_one_error_naming_the_key(tmp_path) -> None:
    with pytest.raises(UserError) as e:
        LPIPS.from_file("")
    msg = str(e.value)
    assert "\n" not in msg and "ctm.lpips_vgg" in msg and "vgg16-397923af.pth" in msg
    assert "download.pytorch.org" in msg and "downloads nothing" in msg
    with pytest.raises(UserError, match="ctm.lpips_vgg: 'nowhere/vgg16.pth' is not a file.*placeholder"):
        LPIPS.from_file("nowhere/vgg16.pth")
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(UserError, match="ctm.lpips_vgg: .* is not the expected weights"):
        LPIPS.from_file(str(bad))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="ctm.lpips_vgg: cannot read"):
        LPIPS.from_file(str(junk))


def test_a_pickle_with_code_is_not_loaded(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "x": Path("/")}, path)   # a non-tensor global: refused
    with pytest.raises(UserError, match="ctm.lpips_vgg: cannot read"):
        LPIPS.from_file(str(path))
