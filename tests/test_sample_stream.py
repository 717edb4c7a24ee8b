"""`ctmkit sample` streams samples to the output batch by batch (bounded memory), refuses an output larger than the
free disk space up front, never leaves half a file, and takes --num-samples (the spelling torchrun can pass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ctmkit
from ctmkit.data import Normalizer
from ctmkit.errors import UserError
from ctmkit.eval.generate import generate, generate_batches, sample_bytes, stream_samples

from .test_cli import ctmkit as run_cli
from .test_cli import ok
from .test_layout import LEGACY_RUN


def test_streamed_npz_equals_the_in_memory_samples(tmp_path):
    model = ctmkit.load_model(LEGACY_RUN)
    x = generate(model, 23, 2, 0.0, 5, None, batch_size=4, progress=False)   # same batches: bitwise the same
    written = stream_samples(generate_batches(model, 23, 2, 0.0, 5, None, batch_size=4, progress=False), 23, None,
                             model.card, tmp_path / "s.npz")
    assert written == [tmp_path / "s.npz", tmp_path / "s.png"]
    want = Normalizer.from_dict(model.card.data.normalizer).to_data(x)
    got = np.load(tmp_path / "s.npz")["samples"]
    assert got.shape == (23, 2) and np.array_equal(got, want)


def test_an_interrupted_stream_leaves_no_file(tmp_path):
    model = ctmkit.load_model(LEGACY_RUN)

    def batches():
        yield from generate_batches(model, 8, 1, 0.0, 0, None, batch_size=4, progress=False)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_samples(batches(), 12, None, model.card, tmp_path / "s.npz")
    assert list(tmp_path.iterdir()) == []


def test_cli_num_samples_spelling_and_batches(tmp_path):
    common = ["sample", "--model", LEGACY_RUN, "--nfe", "2", "--quiet"]
    ok(run_cli(*common, "--num-samples", "30", "--batch-size", "7", "--out", tmp_path / "a.npz", cwd=tmp_path))
    ok(run_cli(*common, "--n", "30", "--batch-size", "7", "--out", tmp_path / "b.npz", cwd=tmp_path))
    ok(run_cli(*common, "--n", "30", "--out", tmp_path / "c.npz", cwd=tmp_path))
    a, b, c = (np.load(tmp_path / f"{k}.npz")["samples"] for k in "abc")
    assert np.array_equal(a, b) and a.shape == (30, 2)
    assert np.allclose(a, c, rtol=0, atol=1e-5)     # other batches: the same noise, float round-off apart


def test_an_output_larger_than_the_disk_is_refused_up_front(tmp_path):
    r = run_cli("sample", "--model", LEGACY_RUN, "--num-samples", "100000000000", "--out", tmp_path / "huge.npz",
                cwd=tmp_path)
    assert r.returncode != 0 and "free" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "huge.npz").exists()
    card = ctmkit.load_model(LEGACY_RUN).card
    assert sample_bytes(card, 10, False) == 10 * 2 * 4 and sample_bytes(card, 10, True) == 10 * (8 + 8)


def test_labels_are_built_per_batch(tmp_path):
    from ctmkit.cli.sample import parse_labels as _parse_labels
    lab = _parse_labels("3,5", 10)
    assert lab(0, 5).tolist() == [3, 5, 3, 5, 3] and lab(10**12 + 1, 2).tolist() == [5, 3]
    assert torch.equal(_parse_labels(None, 4)(6, 4), torch.tensor([2, 3, 0, 1]))
    with pytest.raises(UserError, match="out of range"):
        _parse_labels("12", 10)
