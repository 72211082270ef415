"""The public Python API of resnet-jax: arrays in, arrays out, results as small dataclasses.

`import resnet_jax as rj` exposes every name of `__all__`. The command line is built on the same
functions: each command parses its options and calls one of them (or the job it wraps).

    model = rj.load_model("resnet50.pth")                 # torchvision weights, or a checkpoint dir
    g = rj.per_example_grads(model, images, labels)      # images: (N, H, W, 3) in [0, 1] or uint8
    maps = rj.GradCAM(model)(images)                     # (N, H, W) in [0, 1], predicted class
    issues = rj.label_issues(model.logits(images), labels)  # most suspect first: issues.ranking

Images are NHWC, RGB, either uint8 (0-255) or floats in [0, 1]; `Model.preprocess` applies the
model's own normalisation (ImageNet mean/std for torchvision weights), so no caller does it by hand.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from resnet_jax.core import checkpoint, gradcam as _gradcam, grads as _grads, models, weights
from resnet_jax.core.weights import convert as convert_weights
from resnet_jax.core.data import Dataset, load as load_data, normalize
from resnet_jax.core.data.arrays import unit_float
from resnet_jax.core.models import MODEL_NAMES
from resnet_jax.errors import UserError
from resnet_jax.jobs import audit as _audit, explain as _explain
from resnet_jax.jobs.audit import run_audit
from resnet_jax.jobs.curvature import curvature_of_checkpoint as curvature
from resnet_jax.jobs.cams import run_gradcam
from resnet_jax.jobs.explain import run_explain
from resnet_jax.jobs.extract import load_store, run_extract
from resnet_jax.paper.analysis import (Representations, cluster_spaces, cosine_summaries, misclassification_report,
                                      similarity_table)
from resnet_jax.paper.reproduce import run as reproduce
from resnet_jax.training.train import TrainConfig, fit as train

__all__ = [
    "Model",
    "load_model",
    "create_model",
    "convert_weights",
    "MODEL_NAMES",
    "Dataset",
    "load_data",
    "dataset_from_arrays",
    "Gradients",
    "per_example_grads",
    "GradCAM",
    "GradCAMPlusPlus",
    "Representations",
    "cosine_summaries",
    "cluster_spaces",
    "misclassification_report",
    "similarity_table",
    "LabelIssues",
    "label_issues",
    "ErrorScores",
    "error_scores",
    "Proponents",
    "influence",
    "top_proponents",
    "TrainConfig",
    "train",
    "run_extract",
    "load_store",
    "run_gradcam",
    "audit",
    "run_audit",
    "Explanation",
    "explain",
    "run_explain",
    "curvature",
    "reproduce",
    "UserError",
]  # the same list as resnet_jax._names.NAMES (a test checks)

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


# ----------------------------------------------------------------------------- models and weights

@dataclass(frozen=True, eq=False)
class Model:
    """A ResNet with its weights and how it expects its input.

    `image_size` is the input size it was trained or converted for (others work too: the network
    is fully convolutional up to its pooling); `meta` the checkpoint's metadata, if any."""

    module: models.ResNet  # the Flax module (unbound)
    variables: dict  # {"params", "batch_stats"}
    name: str  # "resnet18", ...
    class_names: tuple[str, ...]
    image_size: int
    normalization: str  # "imagenet" (torchvision weights) or "none" (inputs in [0, 1])
    stem: str = "standard"
    meta: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocess(self, images) -> np.ndarray:
        """Returns images (N, H, W, 3) float32 normalised as the model expects, from uint8 (0-255)
        or floats in [0, 1]; raises UserError for any other shape or range."""
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise UserError(f"images must be (N, H, W, 3) RGB, got shape {x.shape}: "
                            f"channels last (numpy: x.transpose(0, 2, 3, 1) from NCHW)")
        x = unit_float(x)
        return normalize(x, self.normalization)

    def logits(self, images, *, batch_size: int = 64, preprocess: bool = True) -> np.ndarray:
        """Returns the logits (N, C) float32 of images (running BatchNorm statistics)."""
        return self._outputs(images, batch_size, preprocess)[0]

    def features(self, images, *, batch_size: int = 64, preprocess: bool = True) -> np.ndarray:
        """Returns the pooled layer4 features (N, d) float32: the fc layer's input (FM)."""
        return self._outputs(images, batch_size, preprocess)[1]

    def _outputs(self, images, batch_size, preprocess):
        x = self.preprocess(images) if preprocess else np.asarray(images, np.float32)
        step = models.forward_fn(self.module)
        outs = [step(self.variables, _grads.pad_rows(x[s:s + batch_size], batch_size))
                for s in range(0, len(x), batch_size)]
        n = len(x)
        logits = np.concatenate([np.asarray(o[0]) for o in outs])[:n] if outs else np.zeros((0, self.num_classes))
        feats = np.concatenate([np.asarray(o[1]) for o in outs])[:n] if outs else np.zeros((0, 0))
        return logits, feats


def create_model(name: str, num_classes: int, *, image_size: int = 224, stem: str = "standard", seed: int = 0,
                 class_names: Sequence[str] | None = None) -> Model:
    """Returns a freshly initialised `name` (resnet18 ... resnet152) with `num_classes` outputs."""
    import jax

    module = models.create(name, num_classes, stem)
    variables = models.init(module, jax.random.PRNGKey(seed), image_size)
    names = tuple(class_names) if class_names is not None else tuple(str(c) for c in range(num_classes))
    return Model(module, variables, name, names, image_size, "none", stem)


def load_model(source, arch: str | None = None, *, num_classes: int | None = None,
               class_names: Sequence[str] | None = None, image_size: int = 224, stem: str = "standard",
               step: int | None = None) -> Model:
    """Loads a model with its weights from `source`:

    - a checkpoint directory written by `train` or `convert` (`step`: default the latest);
    - a torchvision file (`.pth`/`.pt` state_dict, needs torch; or `.safetensors`), or a state_dict
      mapping of arrays: `arch` names the architecture (default: read from the keys), the classes
      come from `fc.weight` unless `num_classes` says otherwise. ImageNet normalisation."""
    if isinstance(source, Mapping):
        return _from_state(dict(source), "state_dict", arch, num_classes, class_names, image_size, stem)
    path = os.fspath(source)
    if os.path.isdir(path):
        ckpt = checkpoint.load(path, step)
        m = ckpt.meta
        return Model(ckpt.model, ckpt.variables, m["model"], tuple(m["class_names"]), int(m["image_size"]),
                     m.get("normalization", "none"), m.get("stem", "standard"), m)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or checkpoint directory: check the path")
    if not path.endswith(WEIGHT_SUFFIXES):
        raise UserError(f"{path}: not a checkpoint directory nor a weights file ({', '.join(WEIGHT_SUFFIXES)})")
    return _from_state(weights.read_weights(path), path, arch, num_classes, class_names, image_size, stem)


def _from_state(state, source, arch, num_classes, class_names, image_size, stem) -> Model:
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    arch = arch or weights.guess_model(state)
    if arch is None:
        raise UserError(f"{source}: cannot tell the architecture from its keys: pass arch='resnet50' (or another)")
    variables = weights.from_state_dict(state, arch, num_classes, stem)
    weights.finite_weights(variables, source)
    n = int(np.asarray(variables["params"]["fc"]["kernel"]).shape[1])
    names = tuple(class_names) if class_names is not None else tuple(str(c) for c in range(n))
    if len(names) != n:
        raise UserError(f"{source}: {len(names)} class names for {n} classes: pass one name per class")
    return Model(models.create(arch, n, stem), variables, arch, names, int(image_size), "imagenet", stem)


# ----------------------------------------------------------------------------- gradients and maps

@dataclass(frozen=True)
class Gradients:
    """Per-example gradients of a batch and what the forward pass gave (N images).

    gw (N, D) float32: the flattened gradient of each image's loss w.r.t. the chosen parameters (D =
    their size, or `project_dim` with a projection), each parameter flattened row-major in the order
    of `paths` ("fc/kernel", "fc/bias", ...); labels (N,): the labels the loss used; logits and
    probs (N, C); features (N, d) the fc input; preds (N,); loss (N,)."""

    gw: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    features: np.ndarray
    preds: np.ndarray
    loss: np.ndarray
    params: str
    paths: tuple[str, ...]
    project_dim: int | None


def per_example_grads(model: Model, images, labels=None, *, params: str = "fc", label_source: str = "true",
                      project_dim: int | None = None, seed: int = 0, batch_size: int = 64,
                      preprocess: bool = True) -> Gradients:
    """Returns the gradient of each image's cross-entropy w.r.t. the weights (`Gradients`).

    params: "fc" (closed form: exact and as fast as a forward pass), a stage ("layer4", ...), "all",
    or a path pattern; label_source "true" (the `labels`) or "predicted" (the model's argmax; no
    labels needed); project_dim: a seeded random projection to that many dimensions (on device)."""
    x = model.preprocess(images) if preprocess else np.asarray(images, np.float32)
    if len(x) == 0:
        raise UserError("per_example_grads got no images: pass at least one")
    if labels is None and label_source == "true":
        raise UserError("per_example_grads needs labels, or label_source='predicted'")
    y = None if labels is None else np.asarray(labels, np.int32).reshape(-1)
    if y is not None and len(y) != len(x):
        raise UserError(f"{len(x)} images but {len(y)} labels: pass one label per image")
    fn = _grads.build(model.module, model.variables, params=params, label_source=label_source,
                      project_dim=project_dim, seed=seed)
    parts = [fn(x[s:s + batch_size], None if y is None else y[s:s + batch_size])
             for s in range(0, len(x), batch_size)]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("gw", "labels", "logits", "probs", "fm", "preds",
                                                                "loss")}
    return Gradients(cat["gw"], cat["labels"], cat["logits"], cat["probs"], cat["fm"], cat["preds"], cat["loss"],
                     params, tuple(fn.paths), project_dim)


class GradCAM:
    """Grad-CAM maps of a model at one stage (pytorch-grad-cam's front door, in JAX):

        with rj.GradCAM(model, layer="layer4") as cam:
            maps = cam(images, targets)     # (N, H, W) float32 in [0, 1]; targets None: predicted

    A variant changes only how the channels are weighted (`method`); see `GradCAMPlusPlus`."""

    method = "gradcam"

    def __init__(self, model: Model, layer: str = "layer4", batch_size: int = 64):
        _gradcam.check_layer_and_method(layer, self.method)
        self.model, self.layer, self.batch_size = model, layer, int(batch_size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __call__(self, images, targets=None, *, preprocess: bool = True) -> np.ndarray:
        x = self.model.preprocess(images) if preprocess else np.asarray(images, np.float32)
        if targets is not None:
            targets = np.asarray(targets, np.int32).reshape(-1)
            if len(targets) != len(x):
                raise UserError(f"{len(x)} images but {len(targets)} targets: pass one class per image")
        out = []
        for s in range(0, len(x), self.batch_size):
            chunk = x[s:s + self.batch_size]
            tgt = None if targets is None else targets[s:s + self.batch_size]
            out.append(np.asarray(_gradcam.gradcam(self.model.module, self.model.variables, chunk, tgt,
                                                   layer=self.layer, method=self.method)))
        return np.concatenate(out) if out else np.zeros((0,) + x.shape[1:3], np.float32)


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhyay et al., 2018): positive second-order channel weights."""

    method = "gradcampp"


# ----------------------------------------------------------------------------- label errors

@dataclass(frozen=True)
class LabelIssues:
    """Label-error scores of N labelled images: `scores` {method: (N,)} (higher: more suspect),
    `ranking` (N,) image indices from most to least suspect by the first method, `suggested` (N,)
    the label the (last) model predicts."""

    scores: dict
    ranking: np.ndarray
    suggested: np.ndarray
    methods: tuple[str, ...]


def label_issues(logits, labels, *, features=None, learning_rates=None, methods=None) -> LabelIssues:
    """Ranks labelled images for likely label errors from model outputs (cleanlab's
    `find_label_issues(labels, pred_probs)`, from logits of one or several checkpoints).

    logits (N, C), or (T, N, C) for T checkpoints of one run (oldest first); features (N, d) or
    (T, N, d) (the fc input) enable "tracin" (fc self-influence summed over the checkpoints, weighted
    by `learning_rates` (T,), default equal). methods: default margin, loss, and aum/tracin when they
    can be computed ("margin" ranks)."""
    z = np.asarray(logits, np.float64)
    z = z[None] if z.ndim == 2 else z
    if z.ndim != 3:
        raise UserError(f"logits must be (N, C) or (T, N, C), got shape {np.shape(logits)}")
    y = np.asarray(labels).reshape(-1)
    if len(y) != z.shape[1]:
        raise UserError(f"{z.shape[1]} rows of logits but {len(y)} labels: pass one label per image")
    if len(y) and (y.min() < 0 or y.max() >= z.shape[2]):
        raise UserError(f"labels must be in [0, {z.shape[2]}), got [{y.min()}, {y.max()}]")
    f = None if features is None else np.asarray(features, np.float64)
    f = f[None] if f is not None and f.ndim == 2 else f
    if methods is None:
        methods = ["margin", "loss"] + (["aum"] if len(z) > 1 else []) + (["tracin"] if f is not None else [])
    methods = _audit.parse_methods(methods)
    if "tracin" in methods and (f is None or f.shape[:2] != z.shape[:2]):
        raise UserError("method tracin needs features with the logits' (T, N) leading shape")
    if "tracin-proj" in methods:
        raise UserError("method tracin-proj needs projected gradients: use rj.audit on a run")
    outputs = [{"logits": z[t], "features": None if f is None else f[t]} for t in range(len(z))]
    rates = np.ones(len(z)) if learning_rates is None else np.asarray(learning_rates, np.float64)
    scores = _audit.scores(outputs, rates, y, methods)
    from resnet_jax.metrics.detection import ranking

    return LabelIssues(scores, ranking(scores[methods[0]]), _audit.suggested_labels(outputs), tuple(methods))


@dataclass(frozen=True)
class ErrorScores:
    """Misclassification-detection scores of N images: `scores` {key: (N,)} (higher: more likely a
    wrong prediction; keys and meanings in `resnet_jax.metrics.error_scores`), `predictions` (N,), and,
    when the labels were given, `table`: one row per score with its AUROC, AUPR, FPR at 95% TPR and the
    paired bootstrap interval of its AUROC difference from the maximum softmax probability."""

    scores: dict
    predictions: np.ndarray
    table: list | None = None


def error_scores(logits, features=None, *, train_features=None, train_logits=None, train_labels=None,
                 labels=None, seed: int = 0) -> ErrorScores:
    """Scores how likely each prediction is wrong, without the images' labels (what `reproduce`'s
    detection table scores).

    logits (N, C) of the images; features (N, d), their fc input, add the fc-gradient scores; the
    training images' features, logits and labels add the centroid, Mahalanobis, k-NN and gradient-direction
    scores. With `labels` (N,) the scores are also rated against the model's errors (`table`)."""
    from resnet_jax.core.outputs import softmax64
    from resnet_jax.paper import analysis, detection

    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise UserError(f"logits must be (N, C) with C >= 2, got shape {np.shape(logits)}")
    pred = z.argmax(1)

    def rep(fm, zz, y):
        fm = np.zeros((len(zz), 1)) if fm is None else np.asarray(fm, np.float64)
        if fm.ndim != 2 or len(fm) != len(zz):
            raise UserError(f"features must be (N, d) with one row per row of logits, got shape {fm.shape}")
        return analysis.Representations(fm=fm, p=softmax64(zz), logits=zz, labels=np.asarray(y),
                                        preds=zz.argmax(1), label_source="true", gw_kind="kronecker")

    given = [train_features is not None, train_logits is not None, train_labels is not None]
    if any(given) and not all(given):
        raise UserError("pass train_features, train_logits and train_labels together (or none of them)")
    if any(given) and features is None:
        raise UserError("the training-image scores compare features: pass the images' features too")
    train = rep(train_features, np.asarray(train_logits, np.float64), np.asarray(train_labels)) if all(given) else None
    if labels is not None and np.shape(labels) != (len(z),):
        raise UserError(f"labels must be (N,) = ({len(z)},), got shape {np.shape(labels)}")
    test = rep(features, z, pred if labels is None else np.asarray(labels))
    computed = detection.scores(test, train)
    if features is None:  # only the softmax scores: the rest need the fc input
        computed = {k: v for k, v in computed.items() if k in ("msp", "margin", "entropy")}
    table = None if labels is None else detection.rate(test.labels != pred, computed, seed=seed)
    return ErrorScores(computed, pred, table)


# ----------------------------------------------------------------------------- attribution

@dataclass(frozen=True)
class Proponents:
    """The training rows of largest (proponents) and smallest (opponents) influence on each of M
    test rows: indices (M, K) int64 and their scores (M, K), strongest first."""

    indices: np.ndarray
    scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


def _as_trajectory(g, name):
    g = [g] if isinstance(g, np.ndarray) or np.ndim(g) == 2 else list(g)
    out = [np.asarray(a, np.float64) for a in g]
    if not out or any(a.ndim != 2 for a in out):
        raise UserError(f"{name} must be a (N, D) array or a list of them (one per checkpoint)")
    return [{"gw": a} for a in out]


def influence(test_grads, train_grads, *, kind: str = "raw", learning_rates=None) -> np.ndarray:
    """Returns the influence (M, N) of each training row on each test row: TracIn's
    sum_t eta_t <g_t(test), g_t(train)> over checkpoints (a list of arrays per side, or one array),
    `kind` "raw", "cosine" (per checkpoint), "relatif" (over the training row's self-influence's
    square root) or "fisher" (the damped empirical Fisher of the training rows, per checkpoint)."""
    te, tr = _as_trajectory(test_grads, "test_grads"), _as_trajectory(train_grads, "train_grads")
    rates = np.ones(len(te)) if learning_rates is None else np.asarray(learning_rates, np.float64)
    _check_pairs(te, tr, rates)
    m, n = len(te[0]["gw"]), len(tr[0]["gw"])
    return _explain.influence(te, tr, rates, "proj", np.zeros(m, int), np.zeros(n, int), kind=kind)


def top_proponents(test_grads, train_grads, k: int = 10, *, kind: str = "raw", learning_rates=None,
                   chunk: int = 4096) -> Proponents:
    """Returns the `k` proponents and opponents of every test row (`Proponents`), scanning the
    training rows `chunk` at a time (memory O(M chunk), so the training side may be memory-mapped)."""
    te, tr = _as_trajectory(test_grads, "test_grads"), _as_trajectory(train_grads, "train_grads")
    rates = np.ones(len(te)) if learning_rates is None else np.asarray(learning_rates, np.float64)
    _check_pairs(te, tr, rates)
    m, n = len(te[0]["gw"]), len(tr[0]["gw"])
    if not 1 <= int(k) <= n:
        raise UserError(f"k must be from 1 to the {n} training rows, got {k}")
    (pi, ps), (oi, os_) = _explain.top_influences(te, tr, rates, "proj", np.zeros(m, int), np.zeros(n, int),
                                                  int(k), chunk, kind)
    return Proponents(pi, ps, oi, os_)


def _check_pairs(te, tr, rates):
    if len(te) != len(tr) or len(rates) != len(te):
        raise UserError(f"{len(te)} test and {len(tr)} training gradient arrays with {len(rates)} learning rates: "
                        f"pass one of each per checkpoint")
    for a, b in zip(te, tr):
        if a["gw"].shape[1] != b["gw"].shape[1]:
            raise UserError(f"test gradients have {a['gw'].shape[1]} columns, training ones {b['gw'].shape[1]}: "
                            f"compute both with the same params and project_dim")


# ----------------------------------------------------------------------------- jobs on a run

def audit(ckpt_dir: str, data: str | None = None, **kwargs) -> LabelIssues:
    """Audits a training run (every saved checkpoint) for likely label errors of its training data;
    the command line's `audit` writes the same scores with its files (`run_audit`)."""
    res = _audit.audit(ckpt_dir, data, **kwargs)
    methods = tuple(res["scores"])
    from resnet_jax.metrics.detection import ranking

    return LabelIssues(res["scores"], ranking(res["scores"][methods[0]]), np.asarray(res["suggested"]), methods)


@dataclass(frozen=True)
class Explanation:
    """The training images behind M test predictions of a run (`explain`): `explained` (M,) test
    indices with their `true` and `predicted` labels and `test_ids`; `proponents` (a `Proponents`
    of training indices into `train_ids`, strongest first); `nearest` (M, K) the training images of
    most similar features (the baseline an attribution must beat); the checkpoints' `steps` and
    `learning_rates`; the `method` ("proj" or "fc") and influence `kind`."""

    explained: np.ndarray
    true: np.ndarray
    predicted: np.ndarray
    test_ids: tuple[str, ...]
    proponents: Proponents
    nearest: np.ndarray
    train_ids: tuple[str, ...]
    steps: tuple[int, ...]
    learning_rates: np.ndarray
    method: str
    kind: str


def explain(ckpt_dir: str, train: str | None = None, test: str | None = None, **kwargs) -> Explanation:
    """Attributes the misclassified test images of a run (`errors_only=False`: all of them) to its
    training images by TracIn over the run's checkpoints; the keywords are those of `resnet-jax
    explain` (top, method, kind, project_params, project_dim, seed, steps, ...). `run_explain` also
    writes the CSV, JSON and figures."""
    res = _explain.explain(ckpt_dir, train, test, **kwargs)
    m, k = res["explained"].size, int(kwargs.get("top", 10))
    empty = np.zeros((m, k), np.int64), np.zeros((m, k))
    pro = Proponents(res.get("proponents", empty[0]), res.get("proponent_scores", empty[1]),
                     res.get("opponents", empty[0]), res.get("opponent_scores", empty[1]))
    traj = res["trajectory"]
    return Explanation(res["explained"], res["true"], res["predicted"],
                       tuple(res["test"].ids[i] for i in res["explained"]), pro, res.get("nearest", empty[0]),
                       tuple(res["train"].ids), tuple(int(s) for s in traj.steps),
                       np.asarray(traj.learning_rates), res["method"], res["kind"])


def dataset_from_arrays(images, labels, *, class_names: Sequence[str] | None = None, ids=None,
                        masks=None) -> Dataset:
    """Returns a `Dataset` over in-memory images (N, H, W, 3) (uint8 or floats in [0, 1]) and labels."""
    return Dataset.from_arrays(images, labels, class_names=class_names, ids=ids, masks=masks)
