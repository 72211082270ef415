"""Jobs that write a directory: `extract` (a store of gradients, probabilities and features),
`cams` (Grad-CAM maps and their agreement), `audit` (likely label errors of a run), `explain` (the
training images behind each error), `curvature`, and `trajectory` (the checkpoints of one run, shared
by audit and explain). They import the model core, training and the host-side packages.
"""
