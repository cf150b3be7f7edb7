"""Precision: macro-averaged by default, per class with average=None (an `evaluate` metric module,
kept here because evaluate.load("precision") needs the Hub)."""
import datasets
import evaluate
from sklearn.metrics import precision_score


class Precision(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Precision of class predictions.", citation="", inputs_description="class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, labels=None, average="macro"):
        score = precision_score(references, predictions, labels=labels, average=average, zero_division=0)
        return {"precision": score.tolist() if average is None else float(score)}
