"""Inputs: file checks (:mod:`~nir_lightning.data.checks`), loading a pair onto the fixed grid
with MONAI (:mod:`~nir_lightning.data.pair`), the synthetic phantom (:mod:`~nir_lightning.data.phantom`).

Kept import-free so that the checks run before MONAI is loaded.
"""
