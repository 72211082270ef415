"""A store too large for its explicit GW: 10,000 images, 2,048 features, 100 classes (explicit fc
gradients: 10,000 x 204,900 float32 = 8.2 GB). Its Table 1 row and the clustering of GW come from
the factors within 2 GiB of memory (measured in a subprocess: its peak resident set size, VmHWM)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from resnet_jax.jobs import extract

N, D, C = 10_000, 2048, 100

MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np

    def peak_bytes():
        # VmHWM: this process's peak resident set since exec (ru_maxrss may keep the peak of the
        # parent that forked it, e.g. a large pytest process).
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    from resnet_jax.clustering import cluster
    from resnet_jax.jobs import extract
    from resnet_jax.paper import analysis
    t0 = time.perf_counter()
    rep = analysis.Representations.from_store(extract.load_store(sys.argv[1]))
    row = analysis.table1_row("synthetic", rep, None)["row"]
    t1 = time.perf_counter()
    G = rep.gw_unit_gram()  # what analysis.cluster_spaces clusters GW from
    t2 = time.perf_counter()
    same = rep.labels[:, None] == rep.labels[None]
    np.fill_diagonal(same, False)
    intra_from_gram = float(G[same].mean())
    del same
    pick = [0, 1, 4321, 9999]
    entries = G[np.ix_(pick, pick)].tolist()
    result = cluster.cluster_and_score(G, rep.labels, name="unit-length GW", gram=True, methods=("kmeans",),
                                       n_init=1)
    t3 = time.perf_counter()
    del G
    report = analysis.misclassification_report(rep)["nearest_centroid"]["GW"]
    t4 = time.perf_counter()
    print(json.dumps({"row": row, "kmeans": result["scores"]["kmeans"], "seconds": [t1 - t0, t2 - t1, t3 - t2, t4 - t3],
                      "report": {k: report[k] for k in ("n_misclassified", "n_scored")},
                      "description": result["description"], "intra_from_gram": intra_from_gram,
                      "gram_entries": entries, "gw_kind": rep.gw_kind,
                      "peak_bytes": peak_bytes()}))
""")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A complete fc store kept as factors: class-dependent features and logits."""
    out = str(tmp_path_factory.mktemp("big"))
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(N) % C).astype(np.int32)
    centres = rng.standard_normal((C, D), dtype=np.float32)
    fm = np.maximum(centres[labels] + rng.standard_normal((N, D), dtype=np.float32), 0)
    logits = (rng.standard_normal((N, C)) + 4.0 * np.eye(C)[labels]).astype(np.float32)
    e = np.exp(logits - logits.max(1, keepdims=True))
    arrays = {"fm": fm, "logits": logits, "p": (e / e.sum(1, keepdims=True)).astype(np.float32),
              "labels": labels, "preds": logits.argmax(1).astype(np.int32)}
    for name, a in arrays.items():
        np.save(os.path.join(out, f"{name}.npy"), a)
    with open(os.path.join(out, "ids.json"), "w") as f:
        json.dump([str(i) for i in range(N)], f)
    manifest = {"format": extract.STORE_FORMAT, "complete": True, "n": N, "dim": D * C + C, "gw": "factors",
                "run": {"model": "synthetic", "grad_params": "fc", "projection": None, "label_source": "true"},
                "files": [f"{a}.npy" for a in arrays] + ["ids.json"]}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return out, fm, logits, labels


def test_table1_and_clustering_without_forming_gw(big_store):
    out, fm, logits, labels = big_store
    assert N * (D * C + C) * 4 > 8e9
    res = subprocess.run([sys.executable, "-c", MEASURE, out], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["gw_kind"] == "kronecker" and "Gram matrix of unit-length GW (10000 x 10000)" in got["description"]
    assert got["peak_bytes"] < 2 * 2**30, f"peak {got['peak_bytes'] / 2**30:.2f} GiB"
    # Table 1's GW column (per-class sums of the factors) against the mean of the Gram matrix.
    assert got["row"]["Cos_Sim_GW"] == pytest.approx(got["intra_from_gram"], rel=1e-9)
    # A few Gram entries against explicit gradient rows [h (x) delta, delta] built here.
    pick = [0, 1, 4321, 9999]
    z = logits[pick].astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    delta = e / e.sum(1, keepdims=True) - np.eye(C)[labels[pick]]
    g = np.concatenate([np.einsum("nd,nc->ndc", fm[pick].astype(np.float64), delta).reshape(len(pick), -1), delta], 1)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(got["gram_entries"], g @ g.T, atol=1e-10)
    # Features and logits both carry the class: the clusters find it.
    assert got["kmeans"]["ari"] > 0.5
    # The misclassification report of GW, from the factors too.
    preds = logits.argmax(1)
    assert got["report"]["n_misclassified"] == int((preds != labels).sum()) > 0
