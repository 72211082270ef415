"""Figures for the clustering report: the paper's PCA grid and per-class image grids.

PNG only, rendered off-screen with matplotlib's Agg canvas (no pyplot, so no
window or global backend state), and written atomically: to a temporary file in
the target directory, then os.replace.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping

import numpy as np

from resnet_jax.clustering.cluster import align_clusters, reduce_pca
from resnet_jax.clustering.validate import as_labels, as_matrix, check_int

_DPI = 100
_PANEL_INCHES = 3.2
_CELL_INCHES = 1.1
_ROWS = ("true class", "KMeans", "GMM")


def _check_png_path(path):
    """path as a str, after checking it ends in .png and its directory exists."""
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"figure path {path!r} must end in .png")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"output directory {directory} does not exist; create it first")
    return path


def new_figure(width, height):
    """Returns a matplotlib Figure of width x height inches (constrained layout, Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path):
    """Write fig to path as PNG via a temporary file in the same directory; returns path."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=_DPI)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _colours(ids, n):
    """RGBA (len(ids), 4) colours for integer ids in [0, n): tab10/tab20, else turbo."""
    import matplotlib

    if n <= 10:
        return matplotlib.colormaps["tab10"](ids)
    if n <= 20:
        return matplotlib.colormaps["tab20"](ids)
    return matplotlib.colormaps["turbo"](ids / (n - 1))


def pca_grid(reps, labels_true, kmeans_labels, gmm_labels, path, title=None, class_names=None):
    """The paper's figure grid: 2-D PCA projections of each representation, coloured three ways.

    reps: {name: array}, one column per entry in order (e.g. GW, FM, P). An (N, D)
    array with D != 2 is projected to 2-D by PCA (reduce_pca); an (N, 2) array is used
    as coordinates as is (e.g. the first two columns of reduce_gram's scores for GW).
    Rows: coloured by labels_true (N,), by kmeans_labels[name] and by gmm_labels[name]
    (dicts with the same keys as reps). Clusters are coloured by their Hungarian-matched
    class (align_clusters), so colours are comparable across rows. class_names, if
    given, label a legend in the top-left panel (up to 20 classes).
    Writes a PNG atomically and returns path.
    """
    path = _check_png_path(path)
    if not isinstance(reps, Mapping) or not reps:
        raise ValueError("reps must be a non-empty dict {name: (N, D) array}")
    for name, labels in (("kmeans_labels", kmeans_labels), ("gmm_labels", gmm_labels)):
        if not isinstance(labels, Mapping) or set(labels) != set(reps):
            keys = sorted(labels) if isinstance(labels, Mapping) else type(labels).__name__
            raise ValueError(f"{name} keys {keys} differ from reps keys {sorted(reps)}; "
                             "pass one labelling per representation")
    coords = {name: as_matrix(X, f"reps[{name!r}]") for name, X in reps.items()}
    labels_true = np.asarray(labels_true)
    n = labels_true.shape[0] if labels_true.ndim == 1 else -1
    for name, X in coords.items():
        if X.shape[0] != n:
            raise ValueError(f"reps[{name!r}] has {X.shape[0]} rows but labels_true has shape {labels_true.shape}; "
                             "pass one row and one label per image")
    labels_true = as_labels(labels_true, "labels_true", n, classes=True)
    if class_names is not None and len(class_names) <= labels_true.max():
        raise ValueError(f"class_names has {len(class_names)} names but labels_true goes up to {labels_true.max()}")
    rows = {name: (labels_true,
                   align_clusters(labels_true,
                                  as_labels(kmeans_labels[name], f"kmeans_labels[{name!r}]", n, classes=True)),
                   align_clusters(labels_true, as_labels(gmm_labels[name], f"gmm_labels[{name!r}]", n, classes=True)))
            for name in reps}

    axis_labels = {}
    for name, X in coords.items():
        if X.shape[1] == 2:
            axis_labels[name] = ("1st coordinate", "2nd coordinate")
            continue
        Z, info = reduce_pca(X, 2)
        coords[name] = np.column_stack([Z, np.zeros((n, 2 - Z.shape[1]))])
        names = [f"PC{i + 1} ({r:.0%})" for i, r in enumerate(info["explained_variance_ratio"])]
        axis_labels[name] = (names + ["PC2"])[:2]

    n_colours = int(max(r.max() for rs in rows.values() for r in rs)) + 1
    size = float(np.clip(3000 / n, 1, 12))
    fig = new_figure(_PANEL_INCHES * len(reps), _PANEL_INCHES * len(_ROWS))
    axes = fig.subplots(len(_ROWS), len(reps), squeeze=False)
    for col, name in enumerate(reps):
        xy = coords[name]
        for row, (row_name, ids) in enumerate(zip(_ROWS, rows[name])):
            ax = axes[row, col]
            ax.scatter(xy[:, 0], xy[:, 1], c=_colours(ids, n_colours), s=size, linewidths=0)
            ax.set_title(f"{name}: {row_name}", fontsize=9)
            ax.set_xlabel(axis_labels[name][0], fontsize=7)
            ax.set_ylabel(axis_labels[name][1], fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    present = np.unique(labels_true)
    if class_names is not None and len(present) <= 20:
        from matplotlib.lines import Line2D

        colours = _colours(present, n_colours)
        handles = [Line2D([], [], ls="", marker="o", ms=4, color=colours[i], label=str(class_names[c]))
                   for i, c in enumerate(present)]
        axes[0, 0].legend(handles=handles, fontsize=6, loc="best")
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def image_grid(images, labels, class_names, path, per_class=6, overlays=None, alpha=0.5, cmap="jet", title=None):
    """A grid of sample images: one row per class present in labels (ascending), up to
    per_class images per row, the first ones of that class in index order.

    images: (N, H, W, C) with C in {1, 3}, any range: each shown image is min-max scaled
    to [0, 1] on its own (a constant image shows black). labels: (N,) class indices;
    class_names: names indexed by class. overlays: optional (N, H, W) maps in [0, 1]
    (e.g. Grad-CAM) drawn over the images with colour map cmap at opacity alpha.
    Writes a PNG atomically and returns path.
    """
    path = _check_png_path(path)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be (N, H, W, C) with N >= 1 and C in {{1, 3}}, got shape {images.shape}")
    n = images.shape[0]
    labels = as_labels(labels, "labels", n, classes=True)
    if len(class_names) <= labels.max():
        raise ValueError(f"class_names has {len(class_names)} names but labels go up to {labels.max()}")
    check_int(per_class, "per_class", 1)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    present = np.unique(labels)
    shown = [np.flatnonzero(labels == c)[:per_class] for c in present]
    chosen = np.concatenate(shown)
    if not np.isfinite(images[chosen]).all():
        raise ValueError("images to show have NaN/inf pixels; repair them first")
    if overlays is not None:
        overlays = np.asarray(overlays)
        if overlays.shape != images.shape[:3]:
            raise ValueError(f"overlays must have shape {images.shape[:3]} (N, H, W), got {overlays.shape}")
        maps = overlays[chosen]
        if not np.isfinite(maps).all() or maps.min() < 0 or maps.max() > 1:
            raise ValueError("overlays must be finite and in [0, 1]; normalise each map first")

    fig = new_figure(_CELL_INCHES * per_class + 1.0, _CELL_INCHES * len(present) + (0.4 if title else 0.0))
    axes = fig.subplots(len(present), per_class, squeeze=False)
    for row, (c, idx) in enumerate(zip(present, shown)):
        for col in range(per_class):
            ax = axes[row, col]
            if col >= len(idx):
                ax.axis("off")
                continue
            img = images[idx[col]].astype(np.float64)
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img)
            if overlays is not None:
                ax.imshow(overlays[idx[col]], cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[row, 0].set_ylabel(str(class_names[c]), rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def titled_grid(images, titles, path, columns=8, title_colours=None, title=None):
    """A grid of images in the given order, each under its own title (e.g. "given -> suggested").

    images: (N, H, W, C) with C in {1, 3}, each min-max scaled on its own; titles: N strings;
    title_colours: optional N matplotlib colours of the titles. Writes a PNG atomically and
    returns path.
    """
    path = _check_png_path(path)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be (N, H, W, C) with N >= 1 and C in {{1, 3}}, got shape {images.shape}")
    n = images.shape[0]
    if len(titles) != n or (title_colours is not None and len(title_colours) != n):
        raise ValueError(f"{len(titles)} titles for {n} images: pass one title (and colour) per image")
    check_int(columns, "columns", 1)
    columns = min(columns, n)
    rows = -(-n // columns)
    fig = new_figure(_CELL_INCHES * 1.25 * columns, _CELL_INCHES * 1.5 * rows + (0.4 if title else 0.0))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        img = images[k].astype(np.float64)
        lo, hi = np.nanmin(img), np.nanmax(img)
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=1)
        ax.set_title(titles[k], fontsize=7, color="black" if title_colours is None else title_colours[k])
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, path)
