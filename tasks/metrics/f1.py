"""F1: macro-averaged by default, per class with average=None (an `evaluate` metric module,
kept here because evaluate.load("f1") needs the Hub)."""
import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 of class predictions.", citation="", inputs_description="class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, labels=None, average="macro"):
        score = f1_score(references, predictions, labels=labels, average=average, zero_division=0)
        return {"f1": score.tolist() if average is None else float(score)}
