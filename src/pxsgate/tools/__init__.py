"""Off the image path: the demo, the synthetic feed, reports, evaluation and a C-STORE
client."""
