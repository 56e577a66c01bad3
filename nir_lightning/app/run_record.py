"""What ``metrics.json`` says about a registration besides its metrics (steps, versions, the config,
the affine stage), and the line ``nir register`` prints at the end."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nir_lightning._version import __version__
from nir_lightning.app.host_load import STEAL_NOTE_SHARE

__all__ = ["run_record", "summary_line"]


def run_record(*, trainer: Any, dm: Any, cli: Any, seed: int, seconds_fit: float, resumed_step: int | None) -> dict[str, Any]:
    """What ``metrics.json`` says about the run besides the metrics: steps, versions, config, affine stage."""
    import numpy as np
    import torch

    extra: dict[str, Any] = {
        "seconds_fit": seconds_fit,
        "steps": int(trainer.global_step),
        "device": str(trainer.strategy.root_device),  # the module is back on the CPU after predict
        "seed": seed,
        "fixed": dm.fixed,
        "moving": dm.moving,
        "version": __version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),  # CPU results are bitwise reproducible at a fixed thread count
        "python": platform.python_version(),
        "config": _plain(cli.config.as_dict()),
    }
    if dm.affine_result is not None:
        res = dm.affine_result
        extra["affine"] = {
            "kind": res.kind, "seconds": res.seconds, "similarity_before": res.similarity_before,
            "similarity_after": res.similarity_after, "world": np.asarray(res.world).tolist(),
        }
        extra["seconds_affine"] = res.seconds
        if res.waited is not None:  # run by a second process during the imports (a timing: whether it did depends on timing)
            extra["seconds_affine_wait"] = res.waited
    if resumed_step is not None:
        extra["resumed_from_step"] = resumed_step
    return extra


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def summary_line(m: Mapping[str, Any], out: Path) -> str:
    """The one line ``nir register`` prints at the end."""
    fit = f"fit {m['seconds_fit']:.1f}s" + (f" after a {m['seconds_affine']:.1f}s affine stage" if "seconds_affine" in m else "")
    parts = [f"steps={m['steps']}", fit, f"folding {m['folding_percent']:.4f}% ({m['folding_count']} voxels)"]
    if "dice_after" in m:
        affine = f" -> {m['dice_affine']:.3f} (affine)" if "seconds_affine" in m and "dice_affine" in m else ""
        parts.insert(0, f"Dice {m['dice_before']:.3f}{affine} -> {m['dice_after']:.3f}")
    if "hd95_after" in m:
        parts.append(f"HD95 {m['hd95_before']:.2f} -> {m['hd95_after']:.2f} mm")
    if "epe_after_vox" in m:
        parts.append(f"EPE {m['epe_before_vox']:.2f} -> {m['epe_after_vox']:.2f} vox")
    share = _stolen_share(m)
    if share is not None and share >= STEAL_NOTE_SHARE:
        parts.append(f"the host took {100 * share:.0f} % of this machine's CPU time while it ran: its seconds are not the machine's")
    return f"nir register: {', '.join(parts)}; outputs in {out}/"


def _stolen_share(m: Mapping[str, Any]) -> float | None:
    """``seconds_cpu_stolen`` as a share of the machine's CPU time over ``seconds_total``."""
    stolen, total, cpus = m.get("seconds_cpu_stolen"), m.get("seconds_total"), os.cpu_count()
    if not isinstance(stolen, (int, float)) or not isinstance(total, (int, float)) or total <= 0 or not cpus:
        return None
    return float(stolen) / (float(total) * cpus)
