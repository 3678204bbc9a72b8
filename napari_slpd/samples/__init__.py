"""Synthetic data, in one place: procedural H&E slides (``synthetic``), sample cohorts of such slides with
labels and annotations (``sample_cohort``), cohorts made of embeddings for evaluation (``embedding_cohort``) and
of token grids for training (``token_cohort``), large pyramidal mosaics built from a real slide's tiles
(``mosaic``). For tests, benchmarks, the demo and trying the product without data. Qt-free."""
