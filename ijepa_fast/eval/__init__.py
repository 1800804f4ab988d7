"""Frozen-feature evaluation: feature extraction, linear / low-shot / attentive probes, kNN, and the ``ijepa-eval`` CLI.

from ijepa_fast.io.load import load_encoder
from ijepa_fast.eval import extract_features, linear_probe, knn_accuracy

enc = load_encoder("runs/demo/checkpoints/latest.pt").encoder
train_x, train_y = extract_features(enc, train_set)
test_x, test_y = extract_features(enc, test_set)
print(linear_probe(train_x, train_y, test_x, test_y).top1, knn_accuracy(train_x, train_y, test_x, test_y).top1)
"""

from ijepa_fast.eval.attentive import AttentiveProbe, AttentiveResult, attentive_probe
from ijepa_fast.eval.features import FEATURE_MODES, encode, extract_features, extract_tokens
from ijepa_fast.eval.knn import KnnResult, knn_accuracy, knn_predict, knn_topk
from ijepa_fast.eval.lowshot import LabelSubset, LowShot, label_subset
from ijepa_fast.eval.probe import ProbeResult, linear_probe, standardize

__all__ = [
    "FEATURE_MODES",
    "AttentiveProbe",
    "AttentiveResult",
    "KnnResult",
    "LabelSubset",
    "LowShot",
    "ProbeResult",
    "attentive_probe",
    "encode",
    "extract_features",
    "extract_tokens",
    "knn_accuracy",
    "knn_predict",
    "knn_topk",
    "label_subset",
    "linear_probe",
    "standardize",
]
