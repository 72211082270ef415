"""Training: the supervised loop to a target (`train`), the gradient-alignment loss (`align`),
label edits for audits (`labels`) and Hessian-vector products (`hessian`). Imports the model core only.
"""
