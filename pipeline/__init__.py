"""Invariant Information Distillation: unsupervised clustering and segmentation at scale."""

IGNORE_INDEX = 255  # label value of unlabelled / ignored pixels, in shards, losses and metrics
