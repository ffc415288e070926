"""medssl.evaluation: frozen-feature extraction, kNN probes and the kNN monitor handler."""

from .features import extract_features
from .knn import KNNMonitorHandler, knn_accuracy, knn_classify, knn_evaluate, knn_summary, print_knn_summary
