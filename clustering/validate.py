"""Validation of the host-side inputs of the clustering package (one place for all its modules)."""

from __future__ import annotations

import numbers

import numpy as np


def as_matrix(X, name):
    """X as a finite real floating (N, D) array with N >= 2 (integers become float64)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {X.shape}; flatten each example to one row")
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(f"{name} has shape {X.shape}; need at least 2 rows and 1 column")
    if X.dtype == bool or not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise ValueError(f"{name} has dtype {X.dtype}; pass a real numeric array")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    bad = np.count_nonzero(~np.isfinite(X))
    if bad:
        raise ValueError(f"{name} has {bad} NaN/inf entries; drop or repair those examples first")
    return X


def as_labels(labels, name, n=None, classes=False):
    """labels as a 1-D array, of length n when n is given; with classes=True they must be
    non-negative integer class indices."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {labels.shape}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the data has {n} rows; pass one label per row")
    if classes and labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise ValueError(f"{name} must hold non-negative integer class indices")
    return labels


def check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
