"""What the tables are computed from: the representations of a store and their similarity,
clustering and misclassification summaries (host side: numpy, `metrics`, `clustering`).

Representations of each image, as in the draft:
- GW: the per-example gradient of the loss with respect to the fc weights (kernel and bias);
- P: the softmax probabilities; FM: the pooled layer4 features (the fc input).

`Representations.from_store` owns how GW is available. For an fc store without projection GW is
kept as its exact factors (FM, the logits, the labels the loss used) and used through the Kronecker
identity <g_i, g_j> = (h_i.h_j + 1)(delta_i.delta_j), delta = softmax(logits) - onehot(label). The
cosine analyses (Gram matrix, summaries, centroids) use the direction of delta, delta / sum_{c != y}
p_c = (softmax of the other logits, -1 at y), which is exact at any logit margin (delta itself
underflows beyond a margin of about 745 in float64); the N x (d*C + C) matrix is formed only when
`gw_rows` is asked for. Otherwise
the stored rows are used. GW is built with the store's gradient label (`label_source`: "true" or
"predicted"); with factors, the other label is available too (the predicted-label control).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from resnet_jax.core.outputs import softmax64
from resnet_jax.errors import UserError

GRADIENT_LABELS = ("true", "predicted")
CAM_COLUMN_METRIC = {"Grad_Cam_CC": "cc", "Grad_Cam_KLD": "kld", "Grad_Cam_SIM": "sim", "Grad_Cam_SSIM": "ssim",
                     "Grad_Cam_AUC": "auc_judd"}
CONTROL = "GW_pred"
IMBALANCE_RATIO = 1.5  # largest / smallest class above which Cos_Sim is the mean of per-class means
GRAM_CHUNK_ROWS = 2048  # rows of a Gram matrix computed at once (bounds the temporaries)


def unit_rows(X) -> np.ndarray:
    """Returns the rows of X (N, D) scaled to unit length (the geometry of the cosine similarities)."""
    X = np.asarray(X, np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{int(np.sum(norms == 0))} rows are all zero: their direction is undefined")
    return X / norms


def unit_gram(G) -> np.ndarray:
    """Returns the Gram matrix (N, N) of the unit-length rows: G_ij / sqrt(G_ii G_jj)."""
    d = np.sqrt(np.diag(G))
    if np.any(d == 0):
        raise ValueError(f"{int(np.sum(d == 0))} rows are all zero: their direction is undefined")
    return G / np.outer(d, d)


def fc_unit_gram(features, logits, gradient_labels) -> np.ndarray:
    """Returns the (N, N) float64 Gram matrix of the unit-length fc gradients built with
    `gradient_labels`, without forming the gradients (exact at any margin: it uses the direction
    of delta); above GRAM_CHUNK_ROWS rows it is filled in blocks of rows, so its only N x N array
    is the result."""
    from resnet_jax.metrics import similarity

    n = len(features)
    delta = similarity.fc_gradient_deltas(logits, gradient_labels, direction=True)
    if n <= GRAM_CHUNK_ROWS:
        return unit_gram(similarity.fc_gradient_gram(features, delta))
    h = np.asarray(features, np.float64)
    norms = np.sqrt((np.einsum("nd,nd->n", h, h) + 1.0) * np.einsum("nc,nc->n", delta, delta))
    if np.any(norms == 0):
        raise ValueError(f"{int(np.sum(norms == 0))} rows are all zero: their direction is undefined")
    h_unit, delta_unit = h, delta / norms[:, None]
    G = np.empty((n, n))
    for lo in range(0, n, GRAM_CHUNK_ROWS):
        hi = min(n, lo + GRAM_CHUNK_ROWS)
        block = G[lo:hi]
        np.matmul(h_unit[lo:hi], h_unit.T, out=block)
        block += 1.0
        block *= delta_unit[lo:hi] @ delta_unit.T
    return G


@dataclass(eq=False)
class Representations:
    """GW, P and FM of the N images of a store.

    fm (N, d), p (N, C) and logits (N, C) float64; labels and preds (N,); label_source: the gradient
    label GW was built with; gw_kind: "kronecker" (GW kept as its factors fm, logits and the labels) or "explicit" (rows (N, D) in `rows`, read on demand).
    """

    fm: np.ndarray
    p: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    label_source: str
    gw_kind: str
    rows: np.ndarray | None = None

    @classmethod
    def from_store(cls, store: dict) -> "Representations":
        """Builds them from `extract.load_store(...)`; honours the store's label source."""
        man = store["manifest"]
        run = man.get("run", man)
        kind = man.get("gw")
        if kind is None:  # stores written before the manifest said it
            kind = "factors" if run.get("grad_params") == "fc" and run.get("projection") is None else "rows"
        return cls(fm=np.asarray(store["fm"], np.float64), p=np.asarray(store["p"], np.float64),
                   logits=np.asarray(store["logits"], np.float64), labels=np.asarray(store["labels"]),
                   preds=np.asarray(store["preds"]), label_source=run.get("label_source", "true"),
                   gw_kind="kronecker" if kind == "factors" else "explicit",
                   rows=None if kind == "factors" else store["gw"])

    def gradient_labels(self, label_source: str | None = None) -> np.ndarray:
        """(N,) the labels that build GW for `label_source` "true" or "predicted" (None: the store's)."""
        label_source = self.label_source if label_source is None else label_source
        if label_source not in GRADIENT_LABELS:
            raise UserError(f"unknown gradient label {label_source!r}: choose one of {', '.join(GRADIENT_LABELS)}")
        if self.gw_kind == "explicit" and label_source != self.label_source:
            raise UserError(f"the store holds GW rows built with {self.label_source} labels only: extract again "
                            f"with --label-source {label_source}")
        return self.labels if label_source == "true" else self.preds

    def controls(self) -> dict:
        """{space name: gradient label} of the GW spaces available: "GW" (the store's own label) and,
        with factors, "GW_pred" (predicted labels)."""
        out = {"GW": self.label_source}
        if self.gw_kind == "kronecker":
            out[CONTROL] = "predicted"
        return out

    def gw_rows(self, label_source: str | None = None) -> np.ndarray:
        """Returns explicit GW rows (N, D) float64; with factors this forms the N x (d*C + C) matrix."""
        from resnet_jax.metrics import similarity

        labels = self.gradient_labels(label_source)
        if self.gw_kind == "explicit":
            return np.asarray(self.rows, np.float64)
        return similarity.fc_gradients(self.fm, similarity.fc_gradient_deltas(self.logits, labels))

    def gw_unit_gram(self, label_source: str | None = None) -> np.ndarray:
        """Returns the (N, N) Gram matrix of the unit-length GW rows (never forms them with factors)."""
        labels = self.gradient_labels(label_source)
        if self.gw_kind == "kronecker":
            return fc_unit_gram(self.fm, self.logits, labels)
        X = unit_rows(self.rows)
        return X @ X.T

    def gw_centroid_report(self, label_source: str | None = None) -> dict:
        """Returns `clustering.misclassified.centroid_report` of GW (from the factors when kept so)."""
        from resnet_jax.clustering import misclassified
        from resnet_jax.metrics import similarity

        labels = self.gradient_labels(label_source)
        if self.gw_kind == "kronecker":
            a = np.concatenate([self.fm, np.ones((len(self.fm), 1))], axis=1)
            delta = similarity.fc_gradient_deltas(self.logits, labels, direction=True)
            return misclassified.kron_centroid_report(a, delta, self.labels, self.preds)
        return misclassified.centroid_report(np.asarray(self.rows, np.float64), self.labels, self.preds)

    def gw_cosine_summary(self, group_labels, label_source: str | None = None):
        """Returns the CosineSummary of GW grouped by `group_labels`."""
        from resnet_jax.metrics import similarity

        labels = self.gradient_labels(label_source)
        if self.gw_kind == "kronecker":
            return similarity.fc_gradient_cosine_summary(
                self.fm, similarity.fc_gradient_deltas(self.logits, labels, direction=True), group_labels)
        return similarity.pairwise_cosine_summary(np.asarray(self.rows, np.float64), group_labels)


def cosine_summaries(rep: Representations) -> dict:
    """Returns {"GW", "P", "FM", "FM1" (and "GW_pred" with factors): CosineSummary as dict}, grouped by
    the true labels; GW with the store's gradient label; FM1 is [FM, 1], whose cosine bounds the fc GW's
    pair by pair (tables.IDENTITIES)."""
    from resnet_jax.metrics import similarity

    out = {"P": similarity.pairwise_cosine_summary(rep.p, rep.labels),
           "FM": similarity.pairwise_cosine_summary(rep.fm, rep.labels),
           "FM1": similarity.pairwise_cosine_summary(np.concatenate([rep.fm, np.ones((len(rep.fm), 1))], axis=1),
                                                     rep.labels)}
    for space, source in rep.controls().items():
        out[space] = rep.gw_cosine_summary(rep.labels, source)
    return {k: asdict(v) for k, v in out.items()}


def intra_pooling(labels) -> str:
    """Returns "pooled pairs" (every same-class pair weighs the same) when the classes with two or more
    members are balanced (largest / smallest <= IMBALANCE_RATIO), else "per-class mean" (every class
    weighs the same), the intra-class mean Table 1 reports."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    counts = counts[counts > 1]
    return "pooled pairs" if len(counts) and counts.max() <= IMBALANCE_RATIO * counts.min() else "per-class mean"


def prediction_scores(rep: Representations) -> dict:
    """Returns {"ari", "nmi", "accuracy"} of the predictions themselves against the true labels: the
    baseline of GW_pred's clustering, which embeds argmax(P) by construction."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"ari": float(adjusted_rand_score(rep.labels, rep.preds)),
            "nmi": float(normalized_mutual_info_score(rep.labels, rep.preds)),
            "accuracy": float(np.mean(rep.labels == rep.preds))}


def table1_row(name: str, rep: Representations, cams: dict | None) -> dict:
    """Returns {"row": one row of Table 1 (draft columns plus inter-class means and gaps, the
    Grad-CAM different-class baseline, gap, KLD median, pairs left out and mask localisation),
    "summaries": cosine_summaries, "gw_kind"}. Cos_Sim is the pooled mean over same-class pairs, or
    the mean of per-class means where the classes are imbalanced (row["Intra_pooling"] says which)."""
    summaries = cosine_summaries(rep)
    pooling = intra_pooling(rep.labels)
    intra_key = "intra" if pooling == "pooled pairs" else "intra_class_mean"
    row = {"Model": name, "Intra_pooling": pooling}
    for key in ("GW", "P", "FM"):
        row[f"Cos_Sim_{key}"] = summaries[key][intra_key]
        row[f"Inter_{key}"] = summaries[key]["inter"]
        row[f"Gap_{key}"] = summaries[key][intra_key] - summaries[key]["inter"]
    row["Cos_Sim_FM1"] = summaries["FM1"][intra_key]
    if CONTROL in summaries:
        row["Cos_Sim_GW_pred"] = summaries[CONTROL][intra_key]
        row["Inter_GW_pred"] = summaries[CONTROL]["inter"]
    if cams is not None:
        consistency = cams["summary"]["consistency"]
        metrics = consistency["metrics"]
        different = consistency.get("different")
        for column, metric in CAM_COLUMN_METRIC.items():
            short = column[len("Grad_Cam_"):]
            row[column] = metrics[metric]["mean"]
            if different:
                row[f"Diff_{short}"] = different["metrics"][metric]["mean"]
                row[f"CamGap_{short}"] = consistency["gap"][metric]
        row["Grad_Cam_KLD_median"] = metrics["kld"].get("median")
        if different:
            row["Diff_KLD_median"] = different["metrics"]["kld"].get("median")
        row["Cam_pairs"] = consistency["pairs"]
        row["Cam_pairs_left_out"] = max(metrics[m]["undefined"] for m in CAM_COLUMN_METRIC.values())
        loc = cams["summary"].get("localisation")
        if loc:
            for column, metric in CAM_COLUMN_METRIC.items():
                row["Mask_" + column[len("Grad_Cam_"):]] = loc[metric]["mean"]
    return {"row": row, "summaries": summaries, "gw_kind": rep.gw_kind}


def similarity_table(stores: list[str], cams_dirs: list[str] | None = None, names: list[str] | None = None):
    """Returns (rows, details) of Table 1 for extract stores and optional Grad-CAM directories."""
    from resnet_jax.jobs.cams import load_cams
    from resnet_jax.jobs.extract import load_store

    if cams_dirs and len(cams_dirs) != len(stores):
        raise UserError(f"{len(stores)} stores but {len(cams_dirs)} --cams directories: pass one per store, "
                        f"in the same order")
    rows, details = [], []
    for k, path in enumerate(stores):
        store = load_store(path)
        cams = load_cams(cams_dirs[k]) if cams_dirs else None
        if cams is not None and len(cams["labels"]) != len(store["labels"]):
            raise UserError(f"{cams_dirs[k]} holds {len(cams['labels'])} maps but {path} holds "
                            f"{len(store['labels'])} images: compute both with the same data and --limit")
        name = names[k] if names else store["manifest"]["run"].get("model", os.path.basename(path.rstrip("/")))
        result = table1_row(name, Representations.from_store(store), cams)
        rows.append(result["row"])
        details.append(result)
    return rows, details


def cluster_spaces(rep: Representations, seed: int = 0, spaces=None, **kwargs) -> dict:
    """Clusters unit-length GW (and GW_pred), P and FM (or the named `spaces`); returns {space: result}
    of `clustering.cluster.cluster_and_score` (`kwargs` pass on) with labels as lists and the first
    two PCA coordinates. GW with factors is clustered from its Gram matrix (exact PCA), never from
    the rows."""
    from resnet_jax.clustering import cluster

    makers = {space: (lambda source=source: rep.gw_unit_gram(source), rep.gw_kind == "kronecker")
              for space, source in rep.controls().items()}
    if rep.gw_kind == "explicit":
        makers["GW"] = (lambda: unit_rows(rep.rows), False)
    makers["P"] = (lambda: unit_rows(rep.p), False)
    makers["FM"] = (lambda: unit_rows(rep.fm), False)
    order = ["GW", "P", "FM"] + [s for s in makers if s not in ("GW", "P", "FM")]
    out = {}
    for space in order if spaces is None else spaces:
        make, gram = makers[space]
        result = cluster.cluster_and_score(make(), rep.labels, name=f"unit-length {space}", gram=gram, seed=seed,
                                           **kwargs)
        out[space] = {"description": result["description"], "clusterers": result["clusterers"],
                      "scores": result["scores"], "labels": {m: v.tolist() for m, v in result["labels"].items()},
                      "coords2d": np.asarray(result["Z"][:, :2]).round(6).tolist()}
    return out


def misclassification_report(rep: Representations) -> dict:
    """Returns the confusion pairs, the most confidently wrong images and, per space, where each
    misclassified image's nearest class centroid lies (`clustering.misclassified`)."""
    from resnet_jax.clustering import misclassified

    labels, preds = rep.labels, rep.preds
    report = {"n_misclassified": int(np.sum(labels != preds)),
              "confusion_pairs": misclassified.confusion_pairs(labels, preds, top=10),
              "most_confident_wrong": misclassified.most_confident_wrong(softmax64(rep.logits), labels, top=8).tolist(),
              "nearest_centroid": {}}
    reports = {space: (lambda source=source: rep.gw_centroid_report(source))
               for space, source in rep.controls().items()}
    reports.update({"FM": lambda: misclassified.centroid_report(rep.fm, labels, preds),
                    "P": lambda: misclassified.centroid_report(rep.p, labels, preds)})
    for space in ["GW", "FM", "P"] + [s for s in reports if s not in ("GW", "FM", "P")]:
        r = reports[space]()
        report["nearest_centroid"][space] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
    return report
