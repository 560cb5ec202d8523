"""Train/validation/test splits at the subject level, seeded and independent of file order.

A subject (patient) never appears in two splits, so that no scan of a test patient is seen in
training (the reference code split by ``os.listdir`` order and used the training set for
validation). Splits given by the dataset itself (an ``imagesTs`` folder) are kept; the
fractions of the splits so given are then not drawn again from the other subjects.

The split sizes are given either as fractions (train, val, test) or as subject counts
(``counts``, where one entry may be ``None``: "the rest"). Cross-validation folds
(``assign_folds``) hold whole subjects too.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from medlsdm.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    values = np.asarray(list(fractions), dtype=float)
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values < 0) or values[0] <= 0:
        raise ConfigError(f"split.fractions must be three non-negative numbers (train, val, test) with train > 0, "
                          f"got {list(fractions)!r}")
    return values / values.sum()


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Subjects per split: largest-remainder rounding of ``n * fraction``, then every split with a
    positive fraction gets at least one subject when there are enough; with fewer subjects than
    such splits, train gets the first, val the second."""
    fractions = np.asarray(fractions, dtype=float)
    raw = fractions * n
    counts = np.floor(raw).astype(int)
    order = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - counts.sum()]:
        counts[i] += 1
    wanted = [i for i in range(3) if fractions[i] > 0]
    if n < len(wanted):  # too few subjects for every split: one each, train first, then val
        return [1 if i in wanted[:n] else 0 for i in range(3)]
    for i in wanted:
        if counts[i] == 0:
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    return counts.tolist()


def resolve_counts(n: int, counts: Sequence[int | None]) -> list[int]:
    """Explicit subject counts (train, val, test) for `n` subjects; one ``None`` takes the rest,
    otherwise they must add up to `n` exactly (a silently dropped subject would be a surprise)."""
    counts = list(counts)
    valid = len(counts) == 3 and sum(c is None for c in counts) <= 1 and all(
        c is None or (isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0) for c in counts)
    if not valid:
        raise ConfigError(f"split.counts must be three non-negative integers (train, val, test), one of them "
                          f"may be null for 'the rest', got {counts!r}")
    given = sum(c for c in counts if c is not None)
    if None in counts:
        if given > n:
            raise ConfigError(f"split.counts {counts} ask for {given} subjects but only {n} have no explicit split")
        return [n - given if c is None else int(c) for c in counts]
    if given != n:
        raise ConfigError(f"split.counts {counts} add up to {given} but {n} subjects have no explicit split "
                          f"(use null for one split to take the rest)")
    return [int(c) for c in counts]


def assign_splits(subject_ids: Iterable[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                  fixed: Mapping[str, str] | None = None, counts: Sequence[int | None] | None = None
                  ) -> dict[str, str]:
    """{subject: "train" | "val" | "test"}.

    Subjects in `fixed` keep their split. The others are sorted, permuted with
    ``numpy.random.default_rng(seed)`` and cut by `counts` when given (see ``resolve_counts``),
    else by `fractions` (train, val, test), leaving out the splits that `fixed` already provides
    (their fraction goes to the others).
    """
    fractions = _check_fractions(fractions)
    fixed = dict(fixed or {})
    bad = {s: v for s, v in fixed.items() if v not in SPLITS}
    if bad:
        raise ConfigError(f"explicit splits must be one of {', '.join(SPLITS)}, got {bad}")
    subjects = sorted(set(map(str, subject_ids)))
    free = [s for s in subjects if s not in fixed]
    if counts is not None:
        sizes = resolve_counts(len(free), counts)
    else:
        given = set(fixed.values())
        fractions = np.array([0.0 if name in given and name != "train" else f for name, f in zip(SPLITS, fractions)])
        sizes = split_counts(len(free), fractions / fractions.sum())
    order = np.random.default_rng(seed).permutation(len(free))
    out = {s: fixed[s] for s in subjects if s in fixed}
    start = 0
    for name, size in zip(SPLITS, sizes):
        for i in order[start:start + size]:
            out[free[i]] = name
        start += size
    return out


def assign_folds(cases_per_subject: Mapping[str, int], n_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """{subject: fold in 0..n_folds-1} for cross-validation grouped by subject.

    Subjects are permuted with ``numpy.random.default_rng(seed)`` (after sorting, so file order
    does not matter), then, largest first, each goes to the fold with the fewest cases so far
    (the lowest index on ties): folds hold whole subjects and about equal numbers of cases.
    """
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ConfigError(f"number of folds must be an integer >= 2, got {n_folds!r}")
    subjects = sorted(map(str, cases_per_subject))
    if len(subjects) < n_folds:
        raise DataError(f"{len(subjects)} subject(s) cannot fill {n_folds} folds (every fold needs validation "
                        f"subjects); use fewer folds")
    counts = {str(s): int(n) for s, n in cases_per_subject.items()}
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    order.sort(key=lambda s: -counts[s])  # stable: ties keep the seeded order
    load = [0] * n_folds
    folds = {}
    for subject in order:
        fold = min(range(n_folds), key=lambda f: (load[f], f))
        folds[subject] = fold
        load[fold] += counts[subject]
    return folds
