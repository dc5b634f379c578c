"""How a model picks among multiple-choice answers: length bias and confidence.

A model whose next-token distribution is flat tends to prefer short answers: each extra token costs
log-probability, so under plain `acc` (sum of log-likelihoods) the shortest choice wins more often.
These figures test that on the harness's logged samples:

- `shortest_pick_rate`: share of items where the model's pick is a shortest choice (by characters);
- `shortest_gold_rate`: share where the right answer is a shortest choice, the rate of an unbiased model;
- `choice_entropy`: mean entropy, in nats, of the softmax over the choices' scores; log(4) = 1.386 is
  a model that cannot tell four choices apart.

The pick follows the task's primary metric: the highest log-likelihood for `acc`, the highest
log-likelihood per character of the choice for `acc_norm`, as the harness scores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _scores(log_likelihoods: Sequence[float], continuations: Sequence[str], metric: str) -> list[float]:
    if metric == "acc_norm":
        # The harness divides by the choice's length without the " " that joins it to the context.
        return [ll / max(len(text.removeprefix(" ")), 1) for ll, text in zip(log_likelihoods, continuations)]
    return list(log_likelihoods)


def _entropy(scores: Sequence[float]) -> float:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights if w > 0)


def choice_statistics(samples: Sequence[dict[str, Any]], metric: str) -> dict[str, float | int] | None:
    """Return the length-bias and confidence figures over the harness's logged samples of one task.

    Returns None for a task whose choices do not share one context (WinoGrande varies the context,
    not the answer) or that is not scored by `acc` or `acc_norm`.
    """
    if metric not in ("acc", "acc_norm"):
        return None
    items = shortest_picks = shortest_golds = 0
    entropy_sum = 0.0
    for sample in samples:
        arguments = sample["arguments"]
        contexts = {argument[0] for argument in arguments}
        gold = sample["target"]
        if len(contexts) != 1 or len(arguments) < 2 or not isinstance(gold, int):
            return None
        continuations = [argument[1] for argument in arguments]
        log_likelihoods = [float(response[0]) for response in sample["filtered_resps"]]
        scores = _scores(log_likelihoods, continuations, metric)
        pick = max(range(len(scores)), key=scores.__getitem__)
        shortest = min(len(text) for text in continuations)
        items += 1
        shortest_picks += len(continuations[pick]) == shortest
        shortest_golds += len(continuations[gold]) == shortest
        entropy_sum += _entropy(scores)
    if not items:
        return None
    return {
        "items": items,
        "shortest_pick_rate": shortest_picks / items,
        "shortest_gold_rate": shortest_golds / items,
        "choice_entropy": entropy_sum / items,
    }
