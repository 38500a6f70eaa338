"""One module per notebook, in run order: each holds its stage's config (papermill parameters map onto its fields),
a `run` that reads what earlier stages wrote, writes its own artefacts and returns a typed result, and the analysis
its tables and figures need.

sae_loading (01) · discovery (02) · proximity (03) · ablation (04) · steering (05) · report (06) · playground (07)
"""
