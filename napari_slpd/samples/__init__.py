"""Data made to try the product without data: procedural H&E slides, sample cohorts with labels, the demo
cohort. Qt-free."""
