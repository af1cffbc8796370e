#!/usr/bin/env bash
# GPU checks on a lent device machine, in under 8 minutes, written to one JSON:
# mamba-ssm CUDA scan vs the sequential reference, paper-config VM-UNet forward s/slice (b1, b16)
# and one training step, faiss-gpu CAGRA build vs CPU HNSW build at 1M x 768, a similar-case
# query on an index rebuilt on the GPU (bench/gpu_check.py does the measuring).
#
#   bash bench/gpu_check.sh [OUTPUT_JSON]        default: $OUT/gpu_check.json, else ./gpu_check.json
#   bash bench/gpu_check.sh --fetch-wheels       here (registry reachable): download into .whl/ what
#                                                the device machine lacks, to carry there
#
# On a lent machine (the session's device tool): fetch the wheels here, then run there
#   command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 540; the JSON comes back in $OUT.
#
# The device machine reaches no registry. It has Python 3.12 with a CUDA torch (never replaced
# here), nvcc and numba, but no faiss, MONAI or mamba-ssm: those come from the wheels carried in
# .whl/ (GPU_CHECK_WHEELS), installed into a scratch target (GPU_CHECK_SITE), and mamba-ssm's
# CUDA extension is compiled from its sdist for the machine's GPU only, bounded in time. Whatever
# cannot be had is written into the JSON with the reason; the other checks still run. Without a
# GPU the same script runs every check at tiny sizes on the CPU (how it is tested without one).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu-check-site}"
BUILD_SECONDS="${GPU_CHECK_BUILD_SECONDS:-210}"
CHECK_SECONDS="${GPU_CHECK_SECONDS:-240}"
PACKAGES=(faiss-cpu==1.15.1 monai==1.6.1)   # faiss-cpu stands in where no CUDA-13 faiss-gpu wheel is carried
MAMBA=mamba-ssm==2.3.2.post1

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux2014_x86_64)
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$WHEELS" "${PACKAGES[@]}" || exit 1
    MAMBA_SKIP_CUDA_BUILD=TRUE "$PYTHON" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        -d "$WHEELS" "$MAMBA" || exit 1
    ls -l "$WHEELS"
    exit 0
fi

OUTPUT="${1:-${OUT:-.}/gpu_check.json}"
started=$(date +%s)
mkdir -p "$SITE" "$(dirname "$OUTPUT")"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
importable() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

# 1. Packages the node imports that the machine lacks: carried wheels first, the registry if reachable.
for package in "${PACKAGES[@]}"; do
    module="${package%%==*}"; module="${module%-cpu}"
    importable "$module" && continue
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" --target "$SITE" "$package"
    else
        timeout 120 "$PYTHON" -m pip install -q --retries 0 --timeout 15 --no-deps --target "$SITE" "$package"
    fi || echo "gpu_check: $package could not be installed (neither carried in $WHEELS nor reachable)"
done

# 2. mamba-ssm's CUDA scan: compiled here for this GPU's architecture only, within BUILD_SECONDS.
if ! importable mamba_ssm.ops.selective_scan_interface && command -v nvcc >/dev/null \
        && "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    source=$(compgen -G "$WHEELS/mamba_ssm-*.tar.gz" | head -1)
    echo "gpu_check: compiling mamba-ssm for sm_${arch/./} (at most ${BUILD_SECONDS} s) from ${source:-the registry}"
    MAMBA_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" timeout "$BUILD_SECONDS" \
        "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" "${source:-$MAMBA}" \
        || echo "gpu_check: mamba-ssm could not be built in ${BUILD_SECONDS} s; the scan check says so"
fi

# 3. The checks, within what is left of 8 minutes.
left=$(( 470 - ($(date +%s) - started) ))
budget=$(( left < CHECK_SECONDS ? left : CHECK_SECONDS ))
timeout $(( budget + 30 )) "$PYTHON" bench/gpu_check.py --out "$OUTPUT" --budget-seconds "$budget"
status=$?
echo "gpu_check: $(( $(date +%s) - started )) s in all, exit $status, JSON: $OUTPUT"
exit $status
