"""Sample quality of one sampling point (sampler, NFE, gamma) against the data, by one metric:

- swd (vectors, or flattened images): sliced W1 to fresh true data divided by the true-vs-true floor, averaged
  over sampling seeds (docs/method.md section 6), plus an RBF MMD;
- classifier (labelled images): Frechet distance in the features of a small classifier trained on the same data
  (domain-specific: not FID, not comparable across data sets);
- fid (images): Inception-v3 pool3 FID (the optional `fid` extra).

Every metric is a `Quality`: `point(model, sampler, nfe, gamma) -> (value, extras, samples)`, lower is better; a
class-conditional model samples every class in turn, at the classifier-free guidance scale `guidance` when given
(eval/guide.py; the value then measures the guided samples against the data). Its `draw` makes the samples in the
data's model space: `label_draws` by default, a text-to-image model's decoded images from prompts
(eval/prompts.py: `PromptDraws`) for `ctmkit eval --prompts`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError
from ..metrics.fid import (
    FID_DOC,
    INSTALL_HINT,
    InceptionFeatures,
    fid_available,
    inception_path,
    read_ref_stats,
    reference_stats,
)
from ..metrics.frechet import classifier_accuracy, frechet_distance, streamed_stats, train_classifier
from ..metrics.swd import mmd_rbf, swd_ratio
from .generate import generate_batches

METRICS = ("auto", "swd", "classifier", "fid")
CLASSIFIER_DOC = ("Frechet distance between Gaussian fits of the 64-d penultimate features of a small CNN classifier "
                  "trained on the same data (domain-specific; not FID, not comparable across data sets)")
SWD_DOC = "sliced W1 to true data / true-vs-true floor"
KEEP = 256   # samples an image metric's point returns (for grids); the rest are featurised and dropped


def resolve_metric(metric: str, data) -> str:
    """'auto' -> 'swd' for vectors, 'classifier' for labelled images, 'fid' for unlabelled images (fid extra);
    an explicit choice is checked against the data (and the fid extra) before any sampling."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if data.kind == "vector":
        if metric in ("auto", "swd"):
            return "swd"
        raise UserError(f"--metric {metric} needs images, but '{data.spec}' holds vectors: use --metric swd")
    if metric == "auto":
        if data.labels is not None:
            return "classifier"
        if not fid_available():
            raise UserError(f"'{data.spec}' has no labels (the classifier-feature distance needs them) and "
                            f"{INSTALL_HINT} (or use --metric swd)")
        return "fid"
    if metric == "classifier" and data.labels is None:
        raise UserError(f"'{data.spec}' has no labels: --metric classifier needs a labelled image set "
                        "(use --metric fid)")
    if metric == "fid":
        inception_path()  # UserError with the install line when the extra is missing
    return metric


def balanced_labels(model, n: int) -> Tensor | None:
    """Labels 0, 1, ..., K-1, 0, ... for a class-conditional model's n samples; None when unconditional."""
    k = model.card.num_classes
    return torch.arange(n) % k if k > 0 else None


def balanced_label_batches(model):
    """`balanced_labels` one batch at a time: labels(start, b) of samples start .. start + b - 1 (None:
    unconditional)."""
    k = model.card.num_classes
    return (lambda start, b: torch.arange(start, start + b) % k) if k > 0 else None


def label_draws(model, n: int, nfe: int, gamma: float, seed: int, batch_size: int, sampler: str, ts=None,
                guidance: float | None = None, transform=None):
    """A Quality's default `draw`: the model's n samples in batches (generate_batches), a class-conditional model's
    with balanced labels."""
    return generate_batches(model, n, nfe, gamma, seed, balanced_label_batches(model), batch_size, sampler,
                            progress=False, ts=ts, transform=transform, guidance=guidance)


class Quality:
    """One metric: `point()` evaluates a sampling point; `info` holds metric facts for the result (e.g. the
    classifier's accuracy); `floor()` is the value two true samples get; `draw` makes a point's samples (see
    `label_draws`, whose arguments any other draw takes)."""

    name: str
    doc: str
    axis: str

    def __init__(self) -> None:
        self.info: dict = {}
        self.draw = label_draws

    def point(self, model, sampler: str, nfe: int, gamma: float, ts=None, guidance: float | None = None
              ) -> tuple[float, dict, Tensor]:
        """(value, extras, samples) of one sampling point; `ts`: custom times instead of the schedule for nfe;
        `guidance`: the guidance scale (None: the model's own)."""
        raise NotImplementedError

    def floor(self) -> tuple[str, float]:
        raise NotImplementedError


class SWDQuality(Quality):
    """Sliced W1 ratio to the true-vs-true floor, averaged over `seeds` sampling seeds (1000, 1001, ...) of n
    samples; extras: swd, floor, ratio, and mmd (unbiased squared RBF MMD of the first seed's samples to a fresh
    true sample, at most 2000 each)."""

    name, doc, axis = "swd_ratio", SWD_DOC, "sliced W1 / true-vs-true floor (lower is better)"

    def __init__(self, data, n: int = 2000, seeds: int = 4):
        super().__init__()
        self.data, self.n, self.seeds = data, n, seeds

    def true(self, n: int, g: torch.Generator) -> Tensor:
        return self.data.fresh(n, g)

    @torch.no_grad()
    def point(self, model, sampler: str, nfe: int, gamma: float, ts=None, guidance: float | None = None
              ) -> tuple[float, dict, Tensor]:
        samples = [torch.cat(list(self.draw(model, self.n, nfe, gamma, seed, self.n, sampler, ts, guidance))).float()
                   for seed in range(1000, 1000 + self.seeds)]
        r = swd_ratio(samples, self.true)
        m = min(self.n, 2000)
        r["mmd"] = mmd_rbf(samples[0][:m], self.true(m, torch.Generator().manual_seed(7000)))
        return r["ratio"], r, samples[0]

    def floor(self) -> tuple[str, float]:
        return "true data (1.0)", 1.0


class FeatureFD(Quality):
    """Frechet distance of a model's n samples (seed 1) to real statistics (mu_r, s_r) in a feature space."""

    n: int
    mu_r: object
    s_r: object
    data: object

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def point(self, model, sampler: str, nfe: int, gamma: float, ts=None, guidance: float | None = None,
              seed: int = 1) -> tuple[float, dict, Tensor]:
        """Class-conditional models get balanced labels. Samples are featurised batch by batch, each by the process
        that made it (bounded memory; under torchrun the ranks share the feature work); the first KEEP are returned."""
        kept: list[Tensor] = []

        def features():
            for f, x in self.draw(model, self.n, nfe, gamma, seed, 500, sampler, ts, guidance,
                                  transform=lambda x: (self.features(x), x[:KEEP])):
                kept.append(x[:KEEP - sum(len(k) for k in kept)])
                yield f

        mu, s = streamed_stats(features())
        return frechet_distance(mu, s, self.mu_r, self.s_r), {}, torch.cat(kept)

    @torch.no_grad()
    def floor(self) -> tuple[str, float]:
        """Frechet distance between two disjoint halves of min(n, len(data)) real items (the floor at n/2)."""
        perm = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(1))
        half = min(self.n, len(self.data)) // 2
        ma, sa = streamed_stats(self.features(x) for x in self.data.batches(perm[:half], 500))
        mb, sb = streamed_stats(self.features(x) for x in self.data.batches(perm[half:2 * half], 500))
        return "data vs data", frechet_distance(ma, sa, mb, sb)


class ClassifierFD(FeatureFD):
    """Frechet distance of a model's samples to n real items, in a classifier trained on the labelled data."""

    name, doc, axis = "frechet_classifier", CLASSIFIER_DOC, "classifier-feature Frechet distance"

    def __init__(self, data, n: int = 2000, progress: bool | None = False):
        super().__init__()
        if data.labels is None:
            raise UserError(f"'{data.spec}' has no labels: the classifier-feature Frechet distance needs a labelled "
                            "image set (for unlabelled images use --metric fid)")
        self.data, self.n = data, min(n, len(data))
        self.net = train_classifier(data, data.labels, data.num_classes, progress=progress)
        self.info["classifier_accuracy"] = classifier_accuracy(self.net, data, data.labels)
        idx = data.subset(self.n, torch.Generator().manual_seed(0))   # the items data.fresh(n, seed 0) would give
        self.mu_r, self.s_r = streamed_stats(self.net.features(x) for x in data.batches(idx, 500))

    def features(self, x: Tensor) -> Tensor:
        return self.net.features(x)


class InceptionFD(FeatureFD):
    """FID of a model's n samples against the (cached) Inception statistics of min(n, len(data)) real items, or
    against a reference statistics file `ref` (EDM's format, e.g. from `ctmkit fid-ref`)."""

    name, doc, axis = "fid", FID_DOC, "FID"

    def __init__(self, data, n: int = 2000, progress: bool | None = False, ref: str | None = None):
        super().__init__()
        self.data, self.n = data, n
        self.inception = InceptionFeatures(progress=progress)
        if ref is not None:
            self.mu_r, self.s_r = read_ref_stats(ref)
            self.info["reference"] = str(ref)
        else:
            self.mu_r, self.s_r = reference_stats(data, n, features=self.inception)
            self.info["reference_n"] = min(n, len(data))

    def features(self, x: Tensor) -> Tensor:
        return self.inception(x)


def make_quality(metric: str, data, n: int = 2000, seeds: int = 4, progress: bool | None = False,
                 ref: str | None = None, draw=None) -> Quality:
    """The Quality for `metric` ('auto' resolved against the data, see resolve_metric); `ref`: FID against a
    reference statistics file instead of the data (then `data` may be None); `draw`: how its points' samples are
    made (default `label_draws`)."""
    if ref is not None:
        quality: Quality = InceptionFD(data, n, progress=progress, ref=ref)
    elif (metric := resolve_metric(metric, data)) == "swd":
        quality = SWDQuality(data, n, seeds)
    else:
        quality = (InceptionFD if metric == "fid" else ClassifierFD)(data, n, progress=progress)
    quality.draw = draw or quality.draw
    return quality
