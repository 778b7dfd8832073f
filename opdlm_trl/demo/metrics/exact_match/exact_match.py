"""Exact-match metric, shipped in the repository so that it loads offline.

`evaluate.load("exact_match")` needs the Hub; load this module from its local path instead:

```python
import evaluate

metric = evaluate.load("opdlm_trl/demo/metrics/exact_match")  # or the path of this file
metric.compute(predictions=["1 2 3"], references=["1 2 3"])  # {"exact_match": 1.0}
```
"""

import datasets
import evaluate


_DESCRIPTION = """\
Fraction of predictions that are exactly equal to their reference string (after optional whitespace normalisation
and case folding). 1.0 means every prediction matches its reference, 0.0 means none does.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): Predicted strings.
    references (`list[str]`): Reference strings, one per prediction.
    normalize_whitespace (`bool`, defaults to `True`): Strip both ends and collapse inner runs of whitespace to a
        single space before comparing.
    ignore_case (`bool`, defaults to `False`): Compare case-insensitively.

Returns:
    exact_match (`float` in [0, 1]): The fraction of exact matches (0.0 for empty inputs).

Examples:
    >>> metric = evaluate.load("opdlm_trl/demo/metrics/exact_match")
    >>> metric.compute(predictions=["1 2 3", "4 5"], references=["1 2 3", "4 6"])
    {'exact_match': 0.5}
"""

_CITATION = ""


def _normalize(text: str, normalize_whitespace: bool, ignore_case: bool) -> str:
    if normalize_whitespace:
        text = " ".join(text.split())
    if ignore_case:
        text = text.lower()
    return text


class ExactMatch(evaluate.Metric):
    """Exact string match between predictions and references."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=[],
        )

    def _compute(self, predictions, references, normalize_whitespace=True, ignore_case=False):
        if len(predictions) == 0:
            return {"exact_match": 0.0}
        matches = [
            _normalize(p, normalize_whitespace, ignore_case) == _normalize(r, normalize_whitespace, ignore_case)
            for p, r in zip(predictions, references, strict=True)
        ]
        return {"exact_match": float(sum(matches) / len(matches))}
