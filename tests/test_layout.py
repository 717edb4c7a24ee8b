"""The redesign's contracts: the typed model card (and run folders of ctmkit 0.1.0 still load and sample the same
numbers), public load_teacher, config validation per section, progress output off a terminal, and the layer
rules (no import of ctmkit.train outside train/ and the entry points, no cycles, no private cross-module names)."""

from __future__ import annotations

import ast
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import ctmkit
from ctmkit.config import DistillConfig, load_config
from ctmkit.data import load_data
from ctmkit.errors import UserError
from ctmkit.eval.generate import generate
from ctmkit.io.card import FORMAT_VERSION, ModelCard
from ctmkit.progress import LineProgress, progress_bar

FIXTURES = Path(__file__).parent / "fixtures"
PKG = Path(ctmkit.__file__).parent
# written by ctmkit 0.1.0 (before the model card): a 2-step CTM on ring, and generate(model, 4, nfe=2, gamma=0.5,
# seed=0) as that release computed it
LEGACY_RUN = FIXTURES / "run_v0_ring_ctm"
LEGACY_SAMPLES = [[0.09005248546600342, 0.2722024619579315], [0.12289315462112427, 0.248416468501091],
                  [0.02159472554922104, 0.16470584273338318], [0.19563205540180206, 0.21076563000679016]]


def test_a_run_folder_of_the_first_release_loads_and_samples_the_same_numbers():
    model = ctmkit.load_model(LEGACY_RUN)
    card = model.card
    assert card.format_version == 0 and card.kind == "ctm" and card.is_ctm and not card.conditional
    assert card.shape == (2,) and card.data.spec == "ring" and card.backbone.arch == "mlp"
    assert (card.sigma_min, card.sigma_max, card.sigma_data) == (0.002, 80.0, 0.5)
    x = generate(model, 4, 2, 0.5, 0, None, progress=False)
    # The same numbers up to the last bits, which differ between CPUs and kernel paths (vectorised math, BLAS
    # reductions): the first jump mixes x_t at sigma 80 (|x_t| ~ 100, one float32 ulp 7.6e-6) into the next level
    # with weight s/t ~ 0.03, so one ulp there moves a sample by ~2.4e-7; allow four of them. Measured: 6e-8 at most
    # over ATEN_CPU_CAPABILITY default / avx2 / avx512 and 1 or 2 threads (bench/RESULTS.md, "other CPUs").
    assert torch.allclose(x, torch.tensor(LEGACY_SAMPLES, dtype=torch.float32), rtol=0, atol=1e-6)


def test_a_legacy_image_model_card_reads_with_its_classes():
    card = ModelCard.from_dict(json.loads((FIXTURES / "model_v0_digits_teacher.json").read_text()))
    assert card.kind == "teacher" and card.format_version == 0
    assert card.shape == (1, 8, 8) and card.num_classes == 10 and card.conditional
    net = card.backbone.build()      # a conditional network: labels are required (-1 = the null label)
    assert card.backbone.arch == "unet" and net(torch.zeros(2, 1, 8, 8), torch.zeros(2), None,
                                                torch.tensor([3, -1])).shape == (2, 1, 8, 8)


def test_the_card_round_trips_and_is_versioned(tmp_path):
    card = ModelCard.read(LEGACY_RUN)
    card.write(tmp_path)
    d = json.loads((tmp_path / "model.json").read_text())
    assert d["format_version"] == FORMAT_VERSION
    legacy = json.loads((LEGACY_RUN / "model.json").read_text())
    assert {k: v for k, v in d.items() if k != "format_version"} == legacy   # same keys and values as 0.1.0
    again = ModelCard.read(tmp_path)
    assert again == ModelCard(**{**card.__dict__, "format_version": FORMAT_VERSION})


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(kind="gan"), "kind must be"),
    (lambda d: d.pop("backbone"), "malformed"),
    (lambda d: d["data"].update(shape=[0, 2]), "shape"),
    (lambda d: d.update(sigma_min=100.0), "sigma_min < sigma_max"),
    (lambda d: d.update(format_version="one"), "format_version"),
    (lambda d: d.update(format_version=FORMAT_VERSION + 1), "newer than this ctmkit"),
])
def test_a_bad_card_is_one_clear_error(tmp_path, change, words):
    d = json.loads((LEGACY_RUN / "model.json").read_text())
    change(d)
    (tmp_path / "model.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=words):
        ModelCard.read(tmp_path)


def test_the_card_checks_data_shape():
    card = ModelCard.read(LEGACY_RUN)
    card.check_data(load_data("ring"))
    with pytest.raises(UserError, match=r"was trained on shape \(2,\), but 'digits' has shape \(1, 8, 8\)"):
        card.check_data(load_data("digits"))


def test_load_teacher_is_public_and_checks_what_it_loads(tmp_path):
    ring = load_data("ring")
    assert ctmkit.load_teacher("exact", ring) is ring.mixture
    with pytest.raises(UserError, match="known density"):
        ctmkit.load_teacher("exact")
    with pytest.raises(UserError, match="is a ctm run, not a teacher"):
        ctmkit.load_teacher(LEGACY_RUN)
    teacher_dir = tmp_path / "t"   # the same network read as a teacher (EDMDenoiser): loads, checked against data
    shutil.copytree(LEGACY_RUN, teacher_dir)
    d = json.loads((teacher_dir / "model.json").read_text())
    (teacher_dir / "model.json").write_text(json.dumps({**d, "kind": "teacher"}))
    teacher = ctmkit.load_teacher(teacher_dir, ring)
    assert isinstance(teacher, ctmkit.EDMDenoiser) and teacher.card.kind == "teacher"
    with pytest.raises(UserError, match=r"teacher '.*' was trained on shape \(2,\)"):
        ctmkit.load_teacher(teacher_dir, load_data("digits"))


def test_adaptive_weight_clamps_are_validated_config_fields():
    cfg = load_config(DistillConfig, None, None, ["ctm.dsm_weight_max=50", "gan_weight_min=0.1", "gan_weight_max=2"])
    assert (cfg.ctm.dsm_weight_max, cfg.ctm.gan_weight_min, cfg.ctm.gan_weight_max) == (50.0, 0.1, 2.0)
    for bad, words in [("ctm.dsm_weight_max=0", "dsm_weight_max"), ("gan_weight_min=30", "gan_weight_min"),
                       ("train.optimizer=sgd", "train.optimizer"), ("sigma_min=90", "sigma_min < sigma_max")]:
        with pytest.raises(UserError, match=words):
            load_config(DistillConfig, None, None, [bad])


def test_progress_off_a_terminal_prints_a_line_every_ten_percent():
    out = io.StringIO()
    bar = progress_bar(total=1000, desc="distill", stream=out)
    assert isinstance(bar, LineProgress)
    for i in range(1000):
        bar.update(1)
        if i % 100 == 0:
            bar.set_postfix(loss=f"{1 / (i + 1):.3g}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("distill:  10% (100/1000) loss=")
    assert "100% (1000/1000)" in lines[-1]
    out = io.StringIO()
    list(progress_bar(range(7), desc="inner", stream=out, transient=True))   # inner loops stay silent in logs
    list(progress_bar(range(7), desc="off", stream=out, enabled=None))       # None: only on a terminal
    assert out.getvalue() == ""
    out = io.StringIO()
    assert list(progress_bar(range(3), desc="resumed", stream=out)) == [0, 1, 2]
    assert len(out.getvalue().splitlines()) == 3


def test_progress_lines_at_the_edges():
    out = io.StringIO()
    bar = LineProgress(total=10, desc="over", stream=out)
    for _ in range(12):
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("over: 100% (12/10)")   # never above 100 %
    out = io.StringIO()
    bar = LineProgress(total=0, desc="empty", stream=out)
    bar.update(3)
    bar.close()
    assert out.getvalue().startswith("empty: 3")                              # a final line when it moved
    out = io.StringIO()
    bar = LineProgress(total=100, desc="slow", stream=out, seconds=0.0)
    bar.update(1)
    bar.update(1)
    assert len(out.getvalue().splitlines()) == 2                              # a line per minute (here: at once)


def test_progress_resumed_part_way_counts_from_there():
    out = io.StringIO()
    bar = LineProgress(total=100, desc="teacher", initial=45, stream=out)
    for _ in range(55):
        bar.update(1)
    assert [ln.split()[1] for ln in out.getvalue().splitlines()] == ["50%", "60%", "70%", "80%", "90%", "100%"]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, function-level ones included, relative ones resolved."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + (1 if rel.name == "__init__" else 0)] if node.level else []
            if node.level and rel.name != "__init__":
                base = parts[:-1][:len(parts) - node.level]
            mod = ".".join(base + ([node.module] if node.module else []))
            out.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


LAYERS = ["errors progress config job", "core", "nets", "data", "io", "metrics", "teachers", "train eval",
          "cli demo __main__ __init__ diffusers"]


def _top(module: str) -> str:
    """ctmkit.core.solvers -> core; ctmkit -> __init__."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if _top(module) in names.split())


def test_imports_point_down_the_layers_only():
    """Every ctmkit import goes to the same or a lower layer; train and eval never import each other."""
    bad = []
    for path in PKG.rglob("*.py"):
        me = ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        for mod, names in _imports(path):
            if not mod.startswith("ctmkit.") or _top(mod) == _top(me):
                continue
            if _layer(mod) > _layer(me) or {_top(mod), _top(me)} == {"train", "eval"}:
                bad.append(f"{me} imports {mod}")
            bad += [f"{me} imports private {mod}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_what_the_package_cites_is_in_the_repository():
    """Docstrings cite docs/*.md (and their numbered sections) that the repository ships, nothing outside it."""
    import re
    docs = PKG.parent / "docs"
    cited = []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"CTM_SPEC|DESIGN\.md", text), f"{path} cites a document the repository does not ship"
        cited += re.findall(r"docs/([a-z_]+\.md)(?: sections? (\d+))?", text)
    assert cited
    for name, section in cited:
        doc = docs / name
        assert doc.is_file(), f"cited {doc} does not exist"
        if section:
            assert re.search(rf"^## {section}\. ", doc.read_text(), re.M), f"{name} has no section {section}"


def test_a_card_whose_backbone_cannot_be_built_is_one_clear_error(tmp_path):
    from ctmkit.io.runs import build_model
    d = json.loads((FIXTURES / "model_v0_digits_teacher.json").read_text())
    del d["backbone"]["kwargs"]["channel_mult"]
    with pytest.raises(UserError, match="malformed.*KeyError"):
        build_model(ModelCard.from_dict(d))


def test_eval_with_an_exact_or_mismatched_teacher_is_one_clear_error(tmp_path):
    from click.testing import CliRunner

    from ctmkit.cli import main
    base = ["eval", "--model", str(LEGACY_RUN), "--data", "ring", "--n", "20", "--nfe", "1", "--gamma", "0",
            "--out", str(tmp_path / "e.json")]
    for teacher, words in [("exact", "model path 'exact' does not exist"),
                           (str(FIXTURES / "nothing"), "does not exist")]:
        res = CliRunner().invoke(main, base + ["--teacher", teacher])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
