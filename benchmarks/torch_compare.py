"""The PyTorch side of the device check: the same work done the way a PyTorch user would do it.

Rows (samples/s, median of timed calls after warm-up calls, synchronised on CUDA), per model,
random weights and inputs (throughput only):
- `forward`: a batched forward pass without gradients;
- `batch_fwd_bwd`: a batched forward+backward of the mean loss (the ceiling of any per-example
  method: it computes one gradient for the whole batch);
- `per_sample_loop`: one backward per image, the gradients copied out;
- `vmap_grad_all_params`: `torch.func.vmap(grad)` over all parameters (functional_call);
- `vmap_grad_fc_only`: the body without gradients, then vmap(grad) over the fc layer only;
- `gradcam_batched`: Grad-CAM on layer4 with a forward hook, upsampled to the input size.

`parity` converts a random torchvision model with `core.weights.from_state_dict` and compares
its logits and per-example fc gradients with ours on the same inputs (float32, no TF32).

Needs torch and torchvision (optional: the device check skips these rows without them).
    python -m resnet_jax.benchmarks.torch_compare --models resnet18 --size 224 --batch 256 \
        --vmap-batch 64 --json OUT.json
The device check runs this module unless given another script with the same arguments
(`bin/device-check --torch-script PATH OUTDIR`).
"""
from __future__ import annotations

import argparse
import json
import time


def median_seconds(fn, sync, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(name: str, size: int, batch: int, vmap_batch: int, loop_n: int, device: str) -> dict:
    """Returns {row: samples/s} for one torchvision model (a row that fails: `<row>_error`)."""
    import torch
    import torchvision
    from torch.func import functional_call, grad, vmap

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ce = torch.nn.functional.cross_entropy
    net = getattr(torchvision.models, name)(num_classes=1000).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    rows: dict = {}

    def forward():
        with torch.no_grad():
            net(x)

    def fwd_bwd():
        net.zero_grad(set_to_none=True)
        ce(net(x), y).backward()

    def loop():
        for i in range(loop_n):
            net.zero_grad(set_to_none=True)
            ce(net(x[i:i + 1]), y[i:i + 1]).backward()
            _ = [p.grad.clone() for p in net.parameters()]

    rows["forward"] = batch / median_seconds(forward, sync)
    rows["batch_fwd_bwd"] = batch / median_seconds(fwd_bwd, sync)
    rows["per_sample_loop"] = loop_n / median_seconds(loop, sync, repeats=3, warmup=1)

    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())
    per_example = vmap(grad(lambda p, xi, yi: ce(functional_call(net, (p, buffers), (xi[None],)), yi[None])),
                       in_dims=(None, 0, 0))
    xv, yv = x[:vmap_batch], y[:vmap_batch]
    try:
        rows["vmap_grad_all_params"] = vmap_batch / median_seconds(lambda: per_example(params, xv, yv), sync,
                                                                   repeats=3, warmup=1)
    except Exception as e:  # out of memory and the like: say so, go on with the other rows
        rows["vmap_grad_all_params_error"] = " ".join(repr(e).split())[:200]
    if device == "cuda":
        torch.cuda.empty_cache()

    body = torch.nn.Sequential(*list(net.children())[:-1])
    fc = {k: v.detach() for k, v in net.fc.named_parameters()}
    fc_grad = vmap(grad(lambda p, h, yi: ce(functional_call(net.fc, p, (h[None],)), yi[None])), in_dims=(None, 0, 0))

    def fc_only():
        with torch.no_grad():
            h = body(x).flatten(1)
        return fc_grad(fc, h, y)

    rows["vmap_grad_fc_only"] = batch / median_seconds(fc_only, sync)

    saved = {}
    hook = net.layer4.register_forward_hook(lambda mod, inp, out: saved.__setitem__("act", out))

    def gradcam():
        out = net(x)
        act = saved["act"]
        (g,) = torch.autograd.grad(out.gather(1, y[:, None]).sum(), act)
        cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True))
        return torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)

    rows["gradcam_batched"] = batch / median_seconds(gradcam, sync)
    hook.remove()
    return rows


def parity(size: int, batch: int = 4, num_classes: int = 10, model_name: str = "resnet18") -> dict:
    """Logits and per-example fc gradients of a random torchvision model converted with
    `core.weights.from_state_dict`, ours against PyTorch on the same device, float32 without TF32.
    Returns max relative errors (max |ours - torch| / max |torch|)."""
    import jax
    import numpy as np
    import torch
    import torchvision
    from torch.func import functional_call, grad, vmap

    from resnet_jax.benchmarks.speed import random_batch
    from resnet_jax.core import grads, models, weights

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    tm = getattr(torchvision.models, model_name)(num_classes=num_classes)
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BatchNorm is tested
        for mod in tm.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    tm = tm.to(dev).eval()
    state = {k: v.detach().cpu().numpy() for k, v in tm.state_dict().items()}
    variables = weights.from_state_dict(state, model_name, num_classes)
    x, y = random_batch(batch, size, num_classes, seed=3)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
    yt = torch.from_numpy(y.astype(np.int64)).to(dev)
    with torch.no_grad():
        logits_t = tm(xt).cpu().numpy()
        feats = torch.nn.Sequential(*list(tm.children())[:-1])(xt).flatten(1)
    fc = {k: v.detach() for k, v in tm.fc.named_parameters()}
    ce = torch.nn.functional.cross_entropy
    g = vmap(grad(lambda p, h, t: ce(functional_call(tm.fc, p, (h[None],)), t[None])), in_dims=(None, 0, 0))(
        fc, feats, yt)
    # our row layout: fc kernel (d, C) row-major (torch's weight transposed), then the bias
    gw_t = np.concatenate([g["weight"].cpu().numpy().transpose(0, 2, 1).reshape(batch, -1),
                           g["bias"].cpu().numpy()], axis=1)
    model = models.create(model_name, num_classes)
    with jax.default_matmul_precision("highest"):
        ours = grads.compute(model, variables, x, y, params="fc")

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))

    return {"model": model_name, "size": size, "batch": batch, "torch_device": dev,
            "jax_device": jax.devices()[0].device_kind, "logits_rel_err": rel(ours["logits"], logits_t),
            "fc_grad_rel_err": rel(ours["gw"], gw_t), "tolerance": 1e-4}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resnet_jax.benchmarks.torch_compare",
                                 description="PyTorch throughputs of the device check's rows.")
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vmap-batch", type=int, default=32)
    ap.add_argument("--loop-n", type=int, default=32)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"torch": torch.__version__, "device": device, "size": a.size}
    for name in a.models.split(","):
        result[name] = measure(name, a.size, a.batch, a.vmap_batch, a.loop_n, device)
        for row, value in result[name].items():
            shown = value if isinstance(value, str) else f"{value:.1f} samples/s"
            print(f"torch {name:10s} {row:28s} {shown}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
