#!/usr/bin/env bash
# The GPU targets of the benchmark, checked in one run (from the repository root, < 8 minutes):
# nir and FireANTs greedy on the GPU, on the 1 mm brain pair and, optionally, on dev pairs; then,
# per nir row: registration <= 5 s per pair, peak CUDA memory <= 4 GiB, and (given a CPU
# results.csv) Dice within 0.005 of the CPU run of the same pair.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [PAIRS_CSV [CPU_RESULTS_CSV]]
#
# PAIRS_CSV: e.g. the first two 1 mm dev pairs: head -n 3 CACHE/dev_1mm.csv > dev2_1mm.csv
# (see benchmarks/make_raw_pairs.py); skipped if not given. CPU_RESULTS_CSV: a CPU run's
# results.csv of the same pairs (matched by pair name: brain-1mm, s9-s10, ...).
# --dry-run: everything before the CUDA runs (venv, imports, CUDA check), then the commands it
# would run; works on a CPU machine.
#
# Environment: OUT (if set, the tables are copied there, flat), GPU_CHECK_DIR (where the runs
# write; default benchmarks/results/gpu_check), DATA_DIR (the brain pair; default
# ../shared/data/brain-pair), WHEELS (a folder of wheels for an offline machine whose python3
# already holds a CUDA torch), SITE_DIR (where WHEELS go; default /tmp/gpu_check_site).
# With .venv it uses that. Without: given WHEELS, no venv (python3 may itself be a venv's, whose
# packages a new venv would not see): the wheels go into SITE_DIR with --no-index --no-deps, and
# SITE_DIR and the repository go on PYTHONPATH; else it makes a .venv that sees the system site
# packages (so that a CUDA torch already there is used instead of a download) and pip-installs.
set -euo pipefail

dry=0
positional=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
        *) positional+=("$arg") ;;
    esac
done
pairs="${positional[0]:-}"
cpu_csv="${positional[1]:-}"
for f in "$pairs" "$cpu_csv"; do
    if [[ -n "$f" && ! -f "$f" ]]; then echo "gpu_check: no such file: $f" >&2; exit 2; fi
done
[[ -n "$pairs" ]] && pairs="$(realpath "$pairs")"
[[ -n "$cpu_csv" ]] && cpu_csv="$(realpath "$cpu_csv")"
if [[ -n "${WHEELS:-}" ]]; then
    if [[ ! -d "$WHEELS" ]]; then echo "gpu_check: WHEELS is no folder: $WHEELS" >&2; exit 2; fi
    WHEELS="$(realpath "$WHEELS")"
fi
cd "$(dirname "$0")/.."

echo "== venv"
if [[ -d .venv ]]; then
    echo "using .venv"
    . .venv/bin/activate
elif [[ -n "${WHEELS:-}" ]]; then
    site="${SITE_DIR:-/tmp/gpu_check_site}"
    echo "no .venv: $(command -v python3) with $WHEELS/*.whl in $site and the repository on PYTHONPATH"
    if python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
    else  # no pip there: a wheel is a zip of what goes into site-packages
        python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$site" "$WHEELS"/*.whl
    fi
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    python() { python3 "$@"; }  # the python3 whose packages were seen, whatever 'python' is on PATH
else
    echo "creating .venv (with the system site packages)"
    python3 -m venv --system-site-packages .venv
    . .venv/bin/activate
    python -c 'import torch' 2>/dev/null || pip install torch  # the default wheel: CUDA on Linux
    pip install -e ".[test]" fireants
fi

echo "== GPU"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
elif ((dry)); then
    echo "nvidia-smi not found (dry run: fine)"
else
    echo "gpu_check: nvidia-smi not found" >&2
    exit 1
fi
python -c 'import torch, nir_lightning, fireants, nibabel, monai; print("imports ok: torch", torch.__version__, "nir_lightning", nir_lightning.__version__)'
cuda="$(python -c 'import torch; print(torch.cuda.is_available())')"
echo "torch.cuda.is_available(): $cuda"
if [[ "$cuda" != True ]] && ((!dry)); then
    echo "gpu_check: torch sees no GPU (CPU build of torch, or no driver)" >&2
    exit 1
fi

data_dir="${DATA_DIR:-../shared/data/brain-pair}"
if [[ ! -f "$data_dir/subjA_t1.nii.gz" ]]; then
    echo "gpu_check: the 1 mm brain pair is not in $data_dir (set DATA_DIR)" >&2
    ((dry)) || exit 1
fi
work="${GPU_CHECK_DIR:-benchmarks/results/gpu_check}"
common=(python benchmarks/run_benchmark.py --device cuda --methods nir,fireants-greedy --no-hd95 --timeout 240)
runs=(full)
declare -A extra=([full]="--full --data-dir $data_dir")
if [[ -n "$pairs" ]]; then
    runs+=(dev)
    extra[dev]="--pairs $pairs"
else
    echo "no PAIRS_CSV given: skipping the dev pairs"
fi

echo "== runs"
status=0
for run in "${runs[@]}"; do
    # shellcheck disable=SC2206  # the extra options are split on purpose (paths without spaces)
    cmd=("${common[@]}" ${extra[$run]} --out "$work/$run")
    echo "+ ${cmd[*]}"
    ((dry)) && continue
    mkdir -p "$work"
    if ! "${cmd[@]}" >"$work/$run.log" 2>&1; then
        echo "gpu_check: run '$run' had a failed method (or failed itself); the end of $work/$run.log:"
        tail -n 40 "$work/$run.log"
        status=1
    fi
done
if ((dry)); then
    echo "dry run: stopping before the CUDA runs"
    exit 0
fi

echo "== results"
csvs=()
for run in "${runs[@]}"; do
    [[ -f "$work/$run/results.md" ]] || continue
    echo "---- $work/$run/results.md"
    cat "$work/$run/results.md"
    csvs+=("$work/$run/results.csv")
    if [[ -n "${OUT:-}" ]]; then
        for f in results.md results.csv summary.csv; do cp "$work/$run/$f" "$OUT/${run}_$f"; done
    fi
done

echo "== targets"
python - "$cpu_csv" "${csvs[@]}" <<'PY' || status=1
import csv
import sys


def read(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def main(cpu_path: str, paths: list[str]) -> int:
    cpu = {(r["pair"], r["method"]): float(r["dice_after"]) for r in (read(cpu_path) if cpu_path else []) if r["status"] == "ok"}
    failed = 0
    for path in paths:
        for r in read(path):
            if not (r["method"] == "nir" or r["method"].startswith("nir:")):
                continue
            name = f"{r['pair']} {r['method']}"
            if r["status"] != "ok":
                print(f"CHECK {name}: FAIL ({r['status']}: {r['note']})")
                failed += 1
                continue
            sec, mb, dice = float(r["seconds_reg"]), float(r["peak_cuda_mb"] or 0), float(r["dice_after"])
            checks = [(f"reg {sec:.2f} s <= 5 s", sec <= 5.0),
                      (f"peak CUDA {mb:.0f} MiB <= 4096 MiB" + ("" if mb else " (none recorded: not on the GPU?)"), 0 < mb <= 4096)]
            if cpu_path:
                ref = cpu.get((r["pair"], r["method"]))
                if ref is None:
                    print(f"CHECK {name}: no CPU row for this pair in {cpu_path}; Dice not compared")
                else:
                    checks.append((f"Dice {dice:.4f} vs CPU {ref:.4f} (|diff| {abs(dice - ref):.4f} <= 0.005)", abs(dice - ref) <= 0.005))
            ok = all(c for _, c in checks)
            if not ok:
                failed += 1
            print(f"CHECK {name}: {'PASS' if ok else 'FAIL'}: " + "; ".join(f"{t} {'ok' if c else 'MISSED'}" for t, c in checks))
    return 1 if failed else 0


sys.exit(main(sys.argv[1], sys.argv[2:]))
PY
exit "$status"
