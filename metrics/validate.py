"""Validation of the host-side inputs of the metrics package (one place for all its modules)."""

import numpy as np


def as_labels(labels, n, name):
    """labels as an (n,) integer array."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the data, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {labels.dtype}; cast class ids to int")
    return labels


def as_real_matrix(X, name):
    """X as a non-empty real (N, D) array."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (N, D), got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {X.dtype}")
    return X
