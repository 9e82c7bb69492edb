"""A row's Prediction over its batch's arrays (types.BatchScores): the top label read without a sort
is the first label of the full order, ties and a row's padded columns included."""
import numpy as np

from adapterserve.runtime.types import BatchScores, Prediction


def test_top_label_without_a_sort_is_the_first_of_the_order():
    rng = np.random.default_rng(0)
    n_labels = [2, 5, 3, 5, 1, 4]
    logits = np.zeros((len(n_labels), 5), dtype=np.float32)
    for i, n in enumerate(n_labels):
        logits[i, :n] = rng.normal(size=n)
    logits[1, :5] = [0.3, 1.2, 1.2, -4.0, 1.2]  # a three-way tie: the first index wins
    logits[3, :5] = 0.0  # all equal
    mask = np.arange(5) < np.array(n_labels)[:, None]
    ex = np.where(mask, np.exp(logits - logits.max(axis=1, keepdims=True)), 0.0)
    scores = BatchScores((ex / ex.sum(axis=1, keepdims=True)).astype(np.float32), logits)
    for row, n in enumerate(n_labels):
        labels = [f"l{j}" for j in range(n)]
        p = Prediction("t", "v", labels, scores, 3, False, row)
        full = p.top()
        assert [s.index for s in full] == sorted(range(n), key=lambda j: (-scores.probs[row, j], j))
        assert p.top(1) == full[:1] and p.label == full[0].label
        assert len(full) == n  # the padded columns are never labels
    assert Prediction("t", "v", ["a"] * 5, scores, 3, False, 1).label == "a" and scores.best[0][1] == 1
    assert scores.best[0][3] == 0
