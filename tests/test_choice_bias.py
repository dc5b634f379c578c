"""Length-bias and confidence figures over the harness's logged multiple-choice samples."""

from __future__ import annotations

import math

import pytest

from balcony_cli.choice_bias import choice_statistics


def sample(continuations, log_likelihoods, target, contexts=None):
    contexts = contexts or ["Question: which?"] * len(continuations)
    return {
        "arguments": list(zip(contexts, continuations)),
        "filtered_resps": [(ll, False) for ll in log_likelihoods],
        "target": target,
    }


def test_acc_picks_the_highest_log_likelihood():
    samples = [
        # Picks " a" (shortest); gold " ccc" is not shortest.
        sample([" a", " bb", " ccc"], [-1.0, -2.0, -3.0], target=2),
        # Picks " ccc"; gold " a" is shortest.
        sample([" a", " bb", " ccc"], [-3.0, -2.0, -1.0], target=0),
    ]
    figures = choice_statistics(samples, "acc")
    assert figures["items"] == 2
    assert figures["shortest_pick_rate"] == 0.5
    assert figures["shortest_gold_rate"] == 0.5
    # Softmax over (-1, -2, -3) in both items.
    weights = [math.exp(-i) for i in range(3)]
    probabilities = [w / sum(weights) for w in weights]
    assert figures["choice_entropy"] == pytest.approx(-sum(p * math.log(p) for p in probabilities))


def test_acc_norm_length_excludes_space():
    # acc picks " a" (-2.0 against -6.0). Per character without the space, " bbbb" wins (-6/4 = -1.5
    # against -2/1 = -2); counting the space, " a" would still win (-2/2 = -1 against -6/5 = -1.2).
    samples = [sample([" a", " bbbb"], [-2.0, -6.0], target=1)]
    assert choice_statistics(samples, "acc")["shortest_pick_rate"] == 1.0
    assert choice_statistics(samples, "acc_norm")["shortest_pick_rate"] == 0.0


def test_tasks_without_one_shared_context_have_no_figures():
    winogrande = [sample([" goes home.", " goes home."], [-1.0, -2.0], target=0,
                         contexts=["Alice told Bob that Alice", "Alice told Bob that Bob"])]
    assert choice_statistics(winogrande, "acc") is None
    assert choice_statistics([sample([" a", " b"], [-1.0, -2.0], target=0)], "word_perplexity") is None
    assert choice_statistics([], "acc") is None
