"""After the fit: dense evaluation (:mod:`~nir_lightning.evaluation.evaluate`), metrics
(:mod:`~nir_lightning.evaluation.metrics`), the output folder (:mod:`~nir_lightning.evaluation.outputs`),
QC slices (:mod:`~nir_lightning.evaluation.qc`) and figure (:mod:`~nir_lightning.evaluation.qc_figure`).

Kept import-free so that the CLI can read :data:`~nir_lightning.evaluation.output_files.OUTPUT_FILES`
without loading torch.
"""
