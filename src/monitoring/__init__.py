"""Monitoring: early stopping, the progress line, metrics.jsonl + TensorBoard.

Each part is standalone (it knows nothing of the trainer or of the others) and
has state_dict()/load_state_dict() so that a resumed run continues exactly.
"""

from monitoring.early_stopping import EarlyStopping
from monitoring.metrics_log import MetricsLog, summary_text
from monitoring.progress import ProgressLine

__all__ = ["EarlyStopping", "MetricsLog", "ProgressLine", "summary_text"]
