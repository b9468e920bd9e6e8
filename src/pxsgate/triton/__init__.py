"""model.backend triton: the embedding network on a Triton Inference Server (scorer.py)
and ``pxsgate model export``, the model repository entry it serves (export.py)."""
