"""The paper pipeline: `analysis` (the representations of a store and their similarity,
clustering and misclassification summaries), `tables` (markdown and CSV) and `reproduce` (the whole
draft end to end). Imports the jobs and everything below them.
"""
