"""Data readers and normalisation: `load_data(SPEC)` -> a model-space `Dataset` with its `Normalizer`."""

from ctmkit.data.dataset import Dataset
from ctmkit.data.load import load_data
from ctmkit.data.normalize import Normalizer
from ctmkit.data.readers import RestrictedUnpickler
from ctmkit.data.toy import builtin_names

__all__ = ["Dataset", "Normalizer", "RestrictedUnpickler", "builtin_names", "load_data"]
