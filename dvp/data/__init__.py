"""Data: the datasets data.name may name and their image shapes (catalog), the datasets' files read into
train/val/test splits (datasets), and what the model is fed (batches: dynamic binarisation, the encoder's and the
likelihood's inputs, the seeded resumable batch order).

Imports: dvp.core.
"""
