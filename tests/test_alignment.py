"""Distribution alignment (stages/maths/alignment.py): hand-worked golden values, exact pool sums, the iterations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.maths.alignment import (
    QUANTUM,
    align,
    align_in_memory,
    class_prior,
    label_and_confidence,
    next_weights,
    pool_sum,
    sharpen,
    teacher_probs,
)


def test_golden_two_rows_aligned_to_uniform():
    # mean over the pool = [0.7, 0.3]; w = 0.5 / mean = [5/7, 5/3]. Row 0: 8/7 : 2/3 -> 12/19 class 0;
    # row 1: 6/7 : 4/3 -> 14/23 class 1 (the teacher said class 0: the over-predicted class loses it).
    probs = np.array([[0.8, 0.2], [0.6, 0.4]], dtype=np.float32)
    weights, aligned = align_in_memory(probs, None, class_prior("uniform", 2))
    np.testing.assert_allclose(weights, [5 / 7, 5 / 3], rtol=1e-6)
    np.testing.assert_allclose(aligned, [[12 / 19, 7 / 19], [9 / 23, 14 / 23]], rtol=1e-6)
    label, conf = label_and_confidence(aligned, None)
    assert label.tolist() == [0, 1] and conf.dtype == np.float32
    np.testing.assert_allclose(conf, [12 / 19, 14 / 23], rtol=1e-6)
    # the student's target: sharpened back at T = 0.5, (12/19)^2 : (7/19)^2 = 144 : 49
    np.testing.assert_allclose(sharpen(aligned[:1], 0.5), [[144 / 193, 49 / 193]], rtol=1e-6)


def test_golden_labeled_prior_and_top_k_rows():
    assert class_prior("labeled", 3, np.array([0, 0, 1, 2])).tolist() == [0.5, 0.25, 0.25]
    assert class_prior("uniform", 4).tolist() == [0.25] * 4
    with pytest.raises(ValueError, match=r"class\(es\) \[2\].*uniform"):
        class_prior("labeled", 3, np.array([0, 1, 1]))
    # top-2 rows over 3 classes: each row's mass counts for its own two classes only
    idx = np.array([[0, 1], [2, 0]])
    probs = np.array([[0.75, 0.25], [0.5, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(pool_sum(probs, idx, 3), np.array([1.25, 0.25, 0.5]) * QUANTUM)
    # w = (1/3) / ([1.25, 0.25, 0.5] / 2) = [8/15, 8/3, 4/3]: row 0 = 0.75 * 8/15 : 0.25 * 8/3 = 0.4 : 0.667 -> class 1;
    # row 1 = 0.5 * 4/3 : 0.5 * 8/15 = 10 : 4 -> class 2 kept at 5/7
    weights = next_weights(np.ones(3), class_prior("uniform", 3), pool_sum(probs, idx, 3), 2)
    np.testing.assert_allclose(weights, [8 / 15, 8 / 3, 4 / 3], rtol=1e-6)
    aligned = align(probs, idx, weights)
    np.testing.assert_allclose(aligned, [[0.375, 0.625], [5 / 7, 2 / 7]], rtol=1e-6)
    label, conf = label_and_confidence(aligned, idx)
    assert label.tolist() == [1, 2]
    np.testing.assert_allclose(conf, [0.625, 5 / 7], rtol=1e-6)


def test_teacher_probs_recovers_temperature_one_from_float16_soft_labels():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3
    stored = torch.softmax(logits / 0.5, dim=-1).numpy().astype(np.float16)
    np.testing.assert_allclose(teacher_probs(stored, 0.5), torch.softmax(logits, -1).numpy(), atol=2e-3)
    assert teacher_probs(np.zeros((0, 7), np.float16), 0.5).shape == (0, 7)


def test_pool_sums_are_exact_whatever_the_split():
    probs = np.random.default_rng(1).dirichlet(np.ones(5) * 0.3, size=1001).astype(np.float32)
    whole = pool_sum(probs, None, 5)
    for parts in (2, 3, 17):
        pieces = [pool_sum(probs[p], None, 5) for p in np.array_split(np.random.permutation(1001), parts)]
        np.testing.assert_array_equal(sum(pieces), whole)
    assert pool_sum(np.zeros((0, 0)), None, 5).tolist() == [0] * 5
    assert abs(whole.sum() / QUANTUM - 1001) < 1e-3


def test_more_iterations_bring_the_pool_mean_closer_to_the_prior():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (400, 4)) + np.array([1.5, 0, 0, -1])  # a teacher that over-predicts class 0
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    prior = class_prior("uniform", 4)
    gaps = [np.abs(align_in_memory(probs, None, prior, i)[1].mean(0) - prior).max() for i in (1, 2, 4)]
    assert gaps[0] < np.abs(probs.mean(0) - prior).max() and gaps[2] < gaps[1] < gaps[0]
    counts = np.bincount(label_and_confidence(align_in_memory(probs, None, prior, 3)[1], None)[0], minlength=4)
    assert counts.max() - counts.min() < np.ptp(np.bincount(probs.argmax(1), minlength=4))
