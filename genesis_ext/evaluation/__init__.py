"""Evaluating predictions: segmentation metrics (Dice, HD95) and classification metrics (ROC AUC), and scoring
predicted label maps against references (``genesis-ext evaluate``).

    from genesis_ext.evaluation import evaluate_predictions, dice, hd95

    result = evaluate_predictions("pred/", "ref/", {"liver": 1, "spleen": 2}, out_csv="metrics.csv")
    result.summary["classes"]["liver"]["dice"]["mean"]
    print("\\n".join(result.lines()))

No torch; HD95 needs scipy.
"""

from .evaluate import Evaluation, EvaluationError, evaluate_predictions, match_cases, parse_labels
from .metrics import dice, dice_iou, hd95, multiclass_auc, per_class_scores, roc_auc

__all__ = [
    "Evaluation",
    "EvaluationError",
    "dice",
    "dice_iou",
    "evaluate_predictions",
    "hd95",
    "match_cases",
    "multiclass_auc",
    "parse_labels",
    "per_class_scores",
    "roc_auc",
]
