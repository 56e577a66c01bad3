"""How each method is run (inside :mod:`harness.worker`, one subprocess per method and pair).

Every runner writes, into its folder, ``displacement.nii.gz`` (the ITK/ANTs convention of
nir_lightning) and ``native_warped_labels.nii.gz`` (the method's *own* nearest-neighbour warp
of the moving labels, used only to cross-check the conversion), and returns a dict with
``seconds_reg`` (wall time of the registration call only) and the settings it used.

Settings (full runs; ``quick`` shrinks only the iteration counts, for smoke tests):

* ``nir``: :func:`nir_lightning.register_pair` (what ``nir register`` runs) with the package's
  default configuration (no config file) or the named config files; accelerator ``cpu`` or
  ``gpu`` (override ``trainer.accelerator``), ``threads`` torch threads, the run's seed, then the
  ``--nir-args`` overrides. ``seconds_reg`` = ``seconds_affine + seconds_fit`` of its
  ``metrics.json`` (the affine stage, then ``trainer.fit``: includes loading the pair, excludes
  the dense evaluation on the grid).
* ``ants``: ``ants.registration(type_of_transform="SyNOnly", syn_metric="CC", syn_sampling=2``
  (the CC radius), ``reg_iterations=(100, 70, 50))`` with antspyx's defaults for the rest:
  ``grad_step=0.2, flow_sigma=3, total_sigma=0``, shrink factors 4x2x1, smoothing sigmas
  2x1x0 voxels, convergence 1e-7 over 8 iterations, identity initial transform, float32. CPU only
  (ANTs has no GPU path): with ``--device cuda`` it still runs on the CPU.
* ``fireants-greedy``: ``GreedyRegistration(scales=[2, 1], iterations=[200, 200], loss_type="cc",
  cc_kernel_size=5, deformation_type="compositive", optimizer="Adam", optimizer_lr=0.5,
  smooth_warp_sigma=0.5, smooth_grad_sigma=1.0)`` (FireANTs defaults for the rest, including its
  convergence test: tolerance 1e-6 over 10 iterations), raw intensities, ``device`` cpu or cuda.
* ``fireants-syn``: ``SyNRegistration`` with the same settings. Its forward transform needs
  the inverse of the reverse half-warp, which FireANTs computes by an inner optimisation inside
  ``get_warped_coordinates``; that call is timed as part of the registration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from harness.convert import (
    ants_transforms_to_field,
    fireants_coords_to_field,
    max_displacement_mm,
)
from nir_lightning.io import save_displacement_itk, save_nifti

ANTS_SETTINGS: dict[str, Any] = {
    "type_of_transform": "SyNOnly",
    "syn_metric": "CC",
    "syn_sampling": 2,
    "reg_iterations": (100, 70, 50),
    "grad_step": 0.2,
    "flow_sigma": 3,
    "total_sigma": 0,
}
ANTS_QUICK = {"reg_iterations": (10, 5, 2)}

FIREANTS_SETTINGS: dict[str, Any] = {
    "scales": [2, 1],
    "iterations": [200, 200],
    "loss_type": "cc",
    "cc_kernel_size": 5,
    "deformation_type": "compositive",
    "optimizer": "Adam",
    "optimizer_lr": 0.5,
    "smooth_warp_sigma": 0.5,
    "smooth_grad_sigma": 1.0,
}
FIREANTS_QUICK = {"iterations": [10, 5]}

NIR_QUICK: dict[str, Any] = {"trainer.max_steps": 20}

PEER_MODULES = {"ants": ("ants", "antspyx"), "fireants-greedy": ("fireants", "fireants"), "fireants-syn": ("fireants", "fireants"),
                "ants-chain": ("ants", "antspyx"), "fireants-chain": ("fireants", "fireants")}
"""method -> (import name, pip name) of the peer it needs."""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _nib_affine(path: str) -> tuple[tuple[int, int, int], np.ndarray]:
    img: Any = nib.load(path)  # a Nifti1Image
    shape = tuple(int(s) for s in img.shape[:3])
    return (shape[0], shape[1], shape[2]), np.asarray(img.affine, dtype=np.float64)


# -- nir_lightning -----------------------------------------------------------------------


def overrides_from_args(args: Sequence[str]) -> dict[str, str]:
    """Config overrides given as command-line options (``--nir-args``, extra options of
    ``modes_table.py``) as the mapping :func:`nir_lightning.register_pair` takes.

    >>> overrides_from_args(["--trainer.max_steps=300", "--model.lam", "20"])
    {'trainer.max_steps': '300', 'model.lam': '20'}
    """
    out: dict[str, str] = {}
    items = list(args)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) == 2:
            raise ValueError(f"expected a config option --KEY=VALUE or --KEY VALUE, got {item!r}")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ValueError(f"config option --{key} has no value (use --{key}=VALUE)")
            i += 1
            value = items[i]
        out[key] = value
        i += 1
    return out


def nir_overrides(spec: dict[str, Any]) -> dict[str, Any]:
    """The nir run's config overrides: accelerator, ``quick`` steps, mutual information for
    ``multimodal`` pairs (as the peers' chains switch to it: ``nir register --similarity mi``),
    then the user's ``nir_args`` (later entries win)."""
    cuda = spec["device"].startswith("cuda")
    device: dict[str, Any] = {"trainer.accelerator": "gpu", "trainer.devices": 1} if cuda else {"trainer.accelerator": "cpu"}
    contrast = {"model.similarity": "mi"} if spec.get("multimodal") else {}
    return {**device, **(NIR_QUICK if spec.get("quick") else {}), **contrast, **overrides_from_args(spec.get("nir_args", [])),
            **spec.get("settings", {})}


def run_nir(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    from nir_lightning import register_pair
    from nir_lightning.app.allocator import keep_freed_memory

    keep_freed_memory()  # as the `nir` command's process does (this worker is nir's alone)

    nir_out = out / "nir_output"
    configs = list(spec.get("nir_configs", []))
    overrides = nir_overrides(spec)
    print("nir register_pair: config", configs, "overrides", overrides, "seed", spec["seed"], flush=True)
    res = register_pair(
        spec["fixed"], spec["moving"], fixed_labels=spec["fixed_labels"], moving_labels=spec["moving_labels"],
        labels=spec.get("labels") or None, config=configs, output=nir_out, overrides=overrides,
        seed=int(spec["seed"]), threads=int(spec["threads"]), overwrite=True, composed=True,
    )
    m = res.metrics
    # nir's own file is already in the common convention: the whole chain W o (id + u) as one
    # field (composed_displacement.nii.gz), copied as is.
    (out / "displacement.nii.gz").write_bytes((nir_out / "composed_displacement.nii.gz").read_bytes())
    if res.result.warped_labels_nearest is not None:  # warped_labels.nii.gz is label-interpolated
        save_nifti(res.result.warped_labels_nearest.numpy(), res.pair.fixed_affine, out / "native_warped_labels.nii.gz")
    return {
        # the whole chain: the affine stage (run while loading the pair) and the fit
        "seconds_reg": float(m["seconds_fit"]) + float(m.get("seconds_affine") or 0.0),
        "seconds_nir_total": m.get("seconds_total"),
        "steps": m.get("steps"),
        "nir_device": m.get("device"),
        "dice_self_reported": m.get("dice_after"),
        "dice_affine_self_reported": m.get("dice_affine"),
        "seconds_affine": m.get("seconds_affine"),
        "folding_percent_self_reported": m.get("folding_percent"),
        "settings": {"config_files": configs, "overrides": overrides, "config": m.get("config")},
    }


# -- ANTs --------------------------------------------------------------------------------


def run_ants(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    return _run_ants(spec, out, dict(ANTS_SETTINGS, **(ANTS_QUICK if spec.get("quick") else {}), **spec.get("settings", {})))


def _run_ants(spec: dict[str, Any], out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """``ants.registration(**settings)``, its forward transforms composed into our field, and
    ANTs' own nearest-neighbour warp of the labels."""
    import ants

    fixed_shape, fixed_affine = _nib_affine(spec["fixed"])
    fixed = ants.image_read(spec["fixed"])
    moving = ants.image_read(spec["moving"])
    work = out / "ants_work"
    work.mkdir(exist_ok=True)
    print("ants.registration", settings, flush=True)
    t0 = time.perf_counter()
    reg = ants.registration(fixed, moving, outprefix=str(work / "reg_"), verbose=False, **settings)
    seconds = time.perf_counter() - t0
    fwd = list(reg["fwdtransforms"])
    print("fwdtransforms", fwd, flush=True)
    disp = ants_transforms_to_field(fixed, moving, fwd, work, fixed_shape, fixed_affine)
    save_displacement_itk(disp, fixed_affine, out / "displacement.nii.gz")
    labels = ants.image_read(spec["moving_labels"])
    nat = ants.apply_transforms(fixed, labels, fwd, interpolator="nearestNeighbor").numpy()
    save_nifti(np.rint(nat).astype(np.int32), fixed_affine, out / "native_warped_labels.nii.gz")
    print(f"ANTs: max |d| = {max_displacement_mm(disp):.2f} mm", flush=True)
    return {"seconds_reg": seconds, "fwdtransforms": [Path(p).name for p in fwd],
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}


# -- FireANTs ----------------------------------------------------------------------------


def run_fireants(spec: dict[str, Any], out: Path, *, syn: bool) -> dict[str, Any]:
    from fireants.io.image import BatchedImages, Image

    if syn:
        from fireants.registration.syn import SyNRegistration as Registration
    else:
        from fireants.registration.greedy import GreedyRegistration as Registration

    device = spec["device"]
    settings = dict(FIREANTS_SETTINGS, **(FIREANTS_QUICK if spec.get("quick") else {}), **spec.get("settings", {}))
    fixed = BatchedImages([Image.load_file(spec["fixed"], device=device)])
    moving = BatchedImages([Image.load_file(spec["moving"], device=device)])
    print(Registration.__name__, settings, "device", device, flush=True)
    _sync(device)
    t0 = time.perf_counter()
    reg = Registration(fixed_images=fixed, moving_images=moving, progress_bar=False, **settings)
    reg.optimize()
    seconds = _fireants_outputs(reg, fixed, moving, spec, out, t0)
    return {"seconds_reg": seconds, "settings": {"class": Registration.__name__, **settings}}


def _fireants_outputs(reg: Any, fixed: Any, moving: Any, spec: dict[str, Any], out: Path, t0: float) -> float:
    """Finish a FireANTs run: its warped coordinates (timed, from ``t0``) as our displacement
    field, and FireANTs' own nearest-neighbour warp of the labels (its interpolator, its
    transform); returns the registration seconds."""
    import torch
    from fireants.io.image import BatchedImages, Image

    device = spec["device"]
    with torch.no_grad():
        coords = reg.get_warped_coordinates(fixed, moving)
    _sync(device)
    seconds = time.perf_counter() - t0
    fixed_shape, fixed_affine = _nib_affine(spec["fixed"])
    moving_shape, moving_affine = _nib_affine(spec["moving"])
    disp = fireants_coords_to_field(coords, fixed_shape, fixed_affine, moving_shape, moving_affine)
    save_displacement_itk(disp, fixed_affine, out / "displacement.nii.gz")
    labels = BatchedImages([Image.load_file(spec["moving_labels"], device=device)])
    labels.interpolate_mode = "nearest"
    with torch.no_grad():
        nat = reg.evaluate(fixed, labels)[0, 0].permute(2, 1, 0).cpu().numpy()
    save_nifti(np.rint(nat).astype(np.int32), fixed_affine, out / "native_warped_labels.nii.gz")
    print(f"FireANTs: max |d| = {max_displacement_mm(disp):.2f} mm", flush=True)
    return seconds


# -- whole chains on raw / misaligned pairs -------------------------------------------------

ANTS_CHAIN_SETTINGS: dict[str, Any] = {
    "type_of_transform": "SyNRA", "aff_metric": "mattes", "reg_iterations": (100, 70, 50),
    "grad_step": 0.2, "flow_sigma": 3, "total_sigma": 0,
}


def run_ants_chain(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """``ants.registration(type_of_transform="SyNRA")``: rigid + affine (Mattes MI; antspyx's fixed
    2100x1200x1200 iterations at shrink 4x2x2) + SyN with the SyN settings of ``ants`` above: metric
    ``CC`` radius 2 for one contrast, or ``mattes`` (32 bins) when ``spec["multimodal"]``."""
    multimodal = bool(spec.get("multimodal"))
    settings = dict(ANTS_CHAIN_SETTINGS, syn_metric="mattes" if multimodal else "CC", syn_sampling=32 if multimodal else 2)
    if spec.get("quick"):
        settings.update(ANTS_QUICK)
    return _run_ants(spec, out, settings)


def run_fireants_chain(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """FireANTs' whole chain: ``MomentsRegistration`` (centres of mass) -> ``AffineRegistration`` (scales 4,2,1;
    200/100/50 iterations) -> ``GreedyRegistration`` (the greedy settings above) initialised
    with the affine; MI for the affine stages (and for greedy when ``spec["multimodal"]``)."""
    from fireants.io.image import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration
    from fireants.registration.moments import MomentsRegistration

    device = spec["device"]
    settings = dict(FIREANTS_SETTINGS, **(FIREANTS_QUICK if spec.get("quick") else {}))
    if spec.get("multimodal"):
        settings["loss_type"] = "mi"
    fixed = BatchedImages([Image.load_file(spec["fixed"], device=device)])
    moving = BatchedImages([Image.load_file(spec["moving"], device=device)])
    _sync(device)
    t0 = time.perf_counter()
    moments = MomentsRegistration(1.0, fixed, moving, moments=1, loss_type="mi")  # centres of mass
    moments.optimize()
    affine = AffineRegistration([4, 2, 1], [200, 100, 50], fixed, moving, loss_type="mi", optimizer="Adam",
                                **moments.get_affine_init_dict())  # FireANTs' default learning rate
    affine.optimize()
    reg = GreedyRegistration(fixed_images=fixed, moving_images=moving, progress_bar=False,
                             init_affine=affine.get_affine_matrix().detach(), **settings)
    reg.optimize()
    seconds = _fireants_outputs(reg, fixed, moving, spec, out, t0)
    return {"seconds_reg": seconds, "settings": {"chain": "moments(1) -> affine(mi; 4,2,1; 200,100,50) -> greedy", **settings}}


Runner = Callable[[dict[str, Any], Path], dict[str, Any]]
"""``runner(spec, out) -> info``: runs one method on one pair (see the module docstring)."""

RUNNERS: dict[str, Runner] = {
    "nir": run_nir,
    "ants": run_ants,
    "fireants-greedy": lambda spec, out: run_fireants(spec, out, syn=False),
    "fireants-syn": lambda spec, out: run_fireants(spec, out, syn=True),
    "ants-chain": run_ants_chain,
    "fireants-chain": run_fireants_chain,
}


def method_settings(method: str) -> tuple[str, dict[str, Any]]:
    """A method name and the settings it overrides: ``NAME@KEY=VALUE,KEY=VALUE`` runs NAME with
    those settings (a regularisation sweep: ``ants@total_sigma=1``,
    ``fireants-greedy@smooth_warp_sigma=1.0``, ``nir@model.alpha=3``). Values are read as JSON
    where they parse (numbers, lists), else kept as strings.

    >>> method_settings("ants@flow_sigma=4.5,total_sigma=1")
    ('ants', {'flow_sigma': 4.5, 'total_sigma': 1})
    >>> method_settings("nir:diffeo")
    ('nir:diffeo', {})
    """
    import json

    name, _, rest = method.partition("@")
    settings: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method {method!r}: expected KEY=VALUE after '@', got {item!r}")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return name, settings


def runner_for(method: str) -> Runner:
    """``nir`` and ``nir:NAME`` (named configs) share the nir runner; ``@KEY=VALUE`` settings
    (:func:`method_settings`) are passed in the spec."""
    method = method_settings(method)[0]
    base = "nir" if method == "nir" or method.startswith("nir:") else method
    if base not in RUNNERS:
        raise KeyError(f"unknown method {method!r}; known: nir, nir:NAME, {', '.join(k for k in RUNNERS if k != 'nir')}")
    return RUNNERS[base]
