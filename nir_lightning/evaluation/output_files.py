"""Names of the files a registration writes (no heavy imports: the CLI checks them first)."""

OUTPUT_FILES: tuple[str, ...] = (
    "warped.nii.gz",
    "warped_labels.nii.gz",
    "displacement.nii.gz",
    "affine.mat",
    "composed_displacement.nii.gz",
    "jacobian_det.nii.gz",
    "inverse_displacement.nii.gz",
    "metrics.json",
)
"""Files a registration writes (``qc.png`` and ``logs/`` aside); ``metrics.json`` is the last."""

CORE_FILES: tuple[str, ...] = ("warped.nii.gz", "displacement.nii.gz", "affine.mat", "jacobian_det.nii.gz")
"""Written by every successful registration; optional outputs (the inverse) are not required for completeness."""
