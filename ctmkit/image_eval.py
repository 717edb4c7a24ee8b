"""Image evaluation for the demo and benches: sample grids per NFE and a Frechet distance of samples to real
items, either in the features of a small classifier trained on the same labelled data (domain-specific,
documented as such: not FID) or in Inception-v3 pool3 features (FID, the optional `fid` extra)."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .generate import generate
from .metrics.frechet import classifier_accuracy, feature_stats, frechet_distance, train_classifier
from .report import save_curves, save_image_grid

METRIC_DOC = ("Frechet distance between Gaussian fits of the 64-d penultimate features of a small CNN classifier "
              "trained on the same data (domain-specific; not FID, not comparable across data sets)")


class _FeatureFD:
    """Frechet distance of a model's n samples to real statistics (mu_r, s_r) in the feature space `features`."""

    n: int
    mu_r: object
    s_r: object

    def features(self, x):
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, model, nfe: int, gamma: float, sampler: str, seed: int = 1):
        """(samples, Frechet distance) for one sampling point; class-conditional models get balanced labels."""
        num_classes = model.info["backbone"]["kwargs"].get("num_classes", 0)
        labels = torch.arange(self.n) % num_classes if num_classes > 0 else None
        x = generate(model, self.n, nfe, gamma, seed, labels, 500, sampler, progress=False)
        mu, s = feature_stats(self.features(x))
        return x, frechet_distance(mu, s, self.mu_r, self.s_r)


class ClassifierFD(_FeatureFD):
    """Frechet distance of a model's samples to n real items, in a classifier trained on the labelled data."""

    name, doc = "frechet_classifier", METRIC_DOC

    def __init__(self, data, n: int = 2000, progress: bool = False):
        if data.labels is None:
            raise UserError(f"'{data.spec}' has no labels: the classifier-feature Frechet distance needs a labelled "
                            "image set (for unlabelled images use --metric fid)")
        self.data, self.n = data, min(n, len(data))
        self.net = train_classifier(data.x, data.labels, data.num_classes)
        self.accuracy = classifier_accuracy(self.net, data.x, data.labels)
        self.real = data.fresh(self.n, torch.Generator().manual_seed(0))
        self.mu_r, self.s_r = feature_stats(self.net.features(self.real))

    def features(self, x):
        return self.net.features(x)


class InceptionFD(_FeatureFD):
    """FID of a model's n samples against the (cached) Inception statistics of min(n, len(data)) real items."""

    name = "fid"

    def __init__(self, data, n: int = 2000, progress: bool | None = False):
        from .metrics.fid import FID_DOC, InceptionFeatures, reference_stats
        self.doc = FID_DOC
        self.data, self.n = data, n
        self.inception = InceptionFeatures(progress=progress)
        self.mu_r, self.s_r = reference_stats(data, n, features=self.inception)
        self.n_ref = min(n, len(data))

    def features(self, x):
        return self.inception(x)


def feature_fd(metric: str, data, n: int, progress: bool | None = False) -> _FeatureFD:
    """The Frechet-distance evaluator for metric 'classifier' or 'fid'."""
    return (InceptionFD if metric == "fid" else ClassifierFD)(data, n, progress=progress)


def evaluate_images(out: Path, data, teacher, ctm, nfes=(1, 2, 4, 8), n: int = 2000, heun=(3, 5, 9, 17, 35),
                    metric: str = "classifier") -> dict:
    """Sample grids and a Frechet distance ('classifier', 'fid' or 'auto', see evaluate.resolve_metric) for the CTM
    at each NFE (gamma 0 and 1) and the teacher's Heun budgets; writes PNGs into `out`, returns the summary."""
    from .evaluate import resolve_metric
    fd = feature_fd(resolve_metric(metric, data), data, n)
    real, n = data.fresh(min(n, len(data), 100), torch.Generator().manual_seed(0)), fd.n

    rows = []
    for gamma in (0.0, 1.0):
        for k in nfes:
            x, v = fd(ctm, k, gamma, "gamma")
            rows.append({"model": "ctm", "sampler": "gamma", "nfe": k, "gamma": gamma, "value": v})
            if gamma == 0.0:
                save_image_grid(x[:100], out / f"samples_ctm_nfe{k}.png", nrow=10)
    for k in heun:
        x, v = fd(teacher, k, 0.0, "heun")
        rows.append({"model": "teacher", "sampler": "heun", "nfe": k, "gamma": 0.0, "value": v})
        if k == 35:
            save_image_grid(x[:100], out / "samples_teacher_heun35.png", nrow=10)
    save_image_grid(real[:100], out / "samples_data.png", nrow=10)
    _, floor = _split_floor(fd, data, n)
    by = {(r["model"], r["nfe"], r["gamma"]): r["value"] for r in rows}
    save_curves({"CTM gamma=0": (list(nfes), [by[("ctm", k, 0.0)] for k in nfes]),
                 "CTM gamma=1": (list(nfes), [by[("ctm", k, 1.0)] for k in nfes]),
                 "teacher Heun": (list(heun), [by[("teacher", k, 0.0)] for k in heun])},
                out / "quality_vs_nfe.png", "NFE", "FID" if fd.name == "fid" else "classifier-feature Frechet distance",
                f"{data.spec}", hline=("data vs data", floor))
    summary = {"data": data.spec, "metric": fd.name, "metric_doc": fd.doc, "rows": rows, "data_vs_data": floor,
               "ctm_nfe1_vs_teacher_heun35": by[("ctm", 1, 0.0)] / by[("teacher", 35, 0.0)]}
    if isinstance(fd, ClassifierFD):
        summary["classifier_accuracy"] = fd.accuracy
    return summary


@torch.no_grad()
def _split_floor(fd: _FeatureFD, data, n: int):
    """Frechet distance between two disjoint halves of the data (the metric's floor at n/2 samples)."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    half = min(n, len(data)) // 2
    a, b = data.x[perm[:half]], data.x[perm[half:2 * half]]
    ma, sa = feature_stats(fd.features(a))
    mb, sb = feature_stats(fd.features(b))
    return half, frechet_distance(ma, sa, mb, sb)
