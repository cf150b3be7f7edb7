"""ROUGE-1/2/L F-measures of generated texts against references, computed with the rouge_score
package (an `evaluate` metric module, kept here because evaluate.load("rouge") needs the Hub)."""
import datasets
import evaluate


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE F-measures (mean over examples).", citation="", inputs_description="texts",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, rouge_types=("rouge1", "rouge2", "rougeL"), use_stemmer=True):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
        totals = {t: 0.0 for t in rouge_types}
        for prediction, reference in zip(predictions, references):
            scores = scorer.score(reference, prediction)
            for t in rouge_types:
                totals[t] += scores[t].fmeasure
        n = max(len(predictions), 1)
        return {t: totals[t] / n for t in rouge_types}
