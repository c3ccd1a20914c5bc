"""Where users already are: training-framework callbacks and experiment-tracker writers.

Each module needs its optional extra and imports it on first use, so `import vitdiag` never
does: lightning (`vitdiag[lightning]`), transformers (`vitdiag[hf]`), mlflow
(`vitdiag[mlflow]`), wandb (`vitdiag[wandb]`).
"""
