"""medssl.evaluation: frozen-feature extraction, kNN probes, the kNN monitor and the collapse / health monitor."""

from .features import extract_features
from .knn import KNNMonitorHandler, knn_accuracy, knn_classify, knn_evaluate, knn_summary, print_knn_summary
from .health import HealthMonitorHandler, collapse_verdict, effective_rank, embedding_std, usage_entropy
