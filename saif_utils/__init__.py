"""SAIF: sparse-autoencoder features for instruction following — find them, check them, steer with them.

Libraries, usable by any experiment (none imports a stage):
  profiles · paths · io · data        named runs, repository paths, atomic writes and caches, variants and passages
  models · corpus · saes              nnsight model access and residual reads, offline SAE text, sae-lens SAEs
  activations · latent_stats · selection   cached residual reads, contrastive latent scores, selections + directions
  vectors · interventions · methods   steering vectors, residual edits (add, ablate), the steering-method registry
  generation · likelihood             greedy generation under an edit, teacher-forced log-probs (both cached)
  evaluation · stats · semantics      checkers, accuracy with bootstrap CIs, logit lens and cosines
  plots · context · pipeline          every figure, the run folder and run context, the papermill runner
Stages (`saif_utils.stages`), one module per notebook: config dataclass, `run(...)` → typed result, analysis:
  sae_loading 01 · discovery 02 · proximity 03 · ablation 04 · steering 05 · report 06 · playground 07
Data flows one way: data → activations → latent scores → selected latents → steering vectors → generations →
verdicts → tables, figures and the report. A new intervention goes in `interventions`; a new steering method is a
registered class in `methods`.
"""
