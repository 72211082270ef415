"""Host-side numbers of a model's outputs (numpy, float64; no JAX): softmax probabilities and the
loss at a label, shared by the jobs (audit, explain), the paper pipeline and the benches."""
from __future__ import annotations

import numpy as np


def softmax64(logits):
    """Returns softmax probabilities (N, C) computed in float64 (so 1 - p is not rounded to 0)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def label_loss(probs, labels) -> np.ndarray:
    """Returns the cross-entropy (N,) float64 of probabilities (N, C) at labels (N,), -log p clipped at 1e-300."""
    probs = np.asarray(probs, np.float64)
    return -np.log(np.maximum(probs[np.arange(len(probs)), np.asarray(labels)], 1e-300))
