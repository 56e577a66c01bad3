"""Run one method on one pair: ``python -m harness.worker SPEC.json`` (started by run_benchmark.py).

Thread counts are fixed *before* torch/ITK are imported (ITK reads
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` when the library loads). Writes ``worker.json`` in the
method's folder: ``seconds_reg``, peak CUDA memory, thread counts, versions, settings.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    threads = str(spec["threads"])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = threads
    os.environ["ANTS_RANDOM_SEED"] = str(spec["seed"])
    os.environ.setdefault("WANDB_MODE", "disabled")

    import torch

    torch.set_num_threads(int(threads))
    torch.manual_seed(int(spec["seed"]))
    from harness.methods import runner_for
    from nir_lightning.io import write_json_atomic

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    cuda = spec["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    info: dict[str, Any] = {"method": spec["method"], "device": spec["device"], "ok": False}
    try:
        info.update(runner_for(spec["method"])(spec, out))
        info["ok"] = True
    except Exception as exc:  # noqa: BLE001 - any failure is reported to the parent (worker.json + log)
        traceback.print_exc()
        info["error"] = f"{type(exc).__name__}: {exc}"
    info["peak_rss_mb"] = peak_rss_mb()
    info["torch_threads"] = torch.get_num_threads()
    info["env_threads"] = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "ANTS_RANDOM_SEED")}
    info["versions"] = _versions()
    if cuda:
        info["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        info["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        info["gpu"] = torch.cuda.get_device_name()
    write_json_atomic(out / "worker.json", info)  # strict JSON: NaN as null
    return 0 if info["ok"] else 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started, in MiB.

    ``VmHWM`` of ``/proc/self/status`` (Linux) is per address space, so it starts afresh at
    ``exec``. (``ru_maxrss`` does not: Linux carries the parent's RSS at fork over an exec, so a
    child of a large parent would report at least the parent's size.)
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "nir_lightning", "antspyx", "fireants", "monai", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
