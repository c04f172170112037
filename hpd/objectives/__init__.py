"""The objectives: every distillation method as a reweighted log-likelihood.

Pure math over per-token arrays, written once against a minimal ops shim (`ops`) so the
same code runs on torch tensors and mlx arrays: the weight rules (`rules`), the output
heads (`heads`), the counter-based uniforms (`uniforms`), the teacher-source interface
(`teacher`), the plain loss (`losses`) and the chunked loss (`chunked`).
Imports nothing else from hpd: the rest of the toolkit stands on it.
"""
