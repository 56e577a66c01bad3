"""Benchmark harness of nir_lightning against ANTs SyN and FireANTs (issue 4).

Modules:

* :mod:`harness.convert`: every peer's result to one ITK/ANTs displacement field on the fixed
  grid (LPS millimetres, shape ``(X, Y, Z, 1, 3)``, ``p_fixed + d(p_fixed)`` = moving point),
  the same convention as nir_lightning's ``displacement.nii.gz``.
* :mod:`harness.score`: the one evaluation path (``nir_lightning.evaluation.scoring``, what
  ``metrics.json`` is written with, same key names) applied to that field, whatever method
  produced it.
* :mod:`harness.methods`: how each method is run (settings stated there), inside a worker;
  nir_lightning through :func:`nir_lightning.register_pair`.
* :mod:`harness.worker`: the subprocess entry that runs one method on one pair.
* :mod:`harness.report`: CSV, Markdown table and Dice-vs-seconds plot.
* :mod:`harness.pairs`: the pairs CSV, read one way by ``run_benchmark.py`` and the scripts that
  read its runs (a row's name is its result folder).
"""
