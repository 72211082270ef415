"""The model core: everything one forward or backward pass needs.

`models` (the Flax ResNets), `weights` (torchvision import), `checkpoint` (Orbax stores), `params`
(parameter paths and subsets), `losses`, `projection`, `taps`, `grads` (per-example gradients),
`gradcam`, `precision`, `prefetch`, `data` (the three image sources), `files` (atomic stores and
locks) and `outputs` (host-side softmax and loss). It imports nothing above it: not training, not a
job, not the paper pipeline, not the command line.
"""
