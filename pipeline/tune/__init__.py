"""Hyperparameter search: the space (``space``, Ray-free) and the Ray Tune search (``search``)."""
