#!/usr/bin/env bash
# Create the virtual environment of one peer: benchmarks/peers/.venv-<peer> (git-ignored).
#
#   benchmarks/peers/make_venv.sh nnunet     # nnunetv2 from PyPI, pinned below
#   benchmarks/peers/make_venv.sh monai      # monai at the project's own test pin
#
# Each peer gets its own venv so its pins never touch the project's .venv. torch, numpy,
# pillow and pycocotools take the project's pins (read from pyproject.toml), so both sides run
# the same kernels; set BRAINSEG_PEER_TORCH to override (e.g. "torch==2.13.0" takes the
# CPU-only build on some machines: a far smaller venv, but a different torch than brainseg's).
# brainseg itself is not installed: the peer scripts put the repository on PYTHONPATH for
# brainseg's data reading (the MONAI peer); scoring runs in the project's own venv.
set -euo pipefail

NNUNET_PIN="nnunetv2==2.8.1"

peer=${1:-}
case "$peer" in
  nnunet|monai) ;;
  *) echo "make_venv.sh: unknown peer '${peer}': use nnunet or monai" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
venv="$here/.venv-$peer"
python=${PYTHON:-python3}

pin() {  # the project's own pin of a package, e.g. pin torch -> torch==2.14.1
  local spec
  spec=$(grep -oE "\"$1==[^\"]+\"" "$root/pyproject.toml" | head -1 | tr -d '"')
  if [ -z "$spec" ]; then echo "make_venv.sh: no pin of $1 in $root/pyproject.toml" >&2; exit 2; fi
  echo "$spec"
}

torch_pin=${BRAINSEG_PEER_TORCH:-$(pin torch)}
common=("$torch_pin" "$(pin numpy)" "$(pin pillow)")
if [ "$peer" = nnunet ]; then
  packages=("${common[@]}" "$NNUNET_PIN")
else  # brainseg's arrays (PYTHONPATH) need pycocotools; the network and loss are MONAI's
  packages=("${common[@]}" "$(pin monai)" "$(pin pycocotools)")
fi

if [ -x "$venv/bin/python" ]; then
  echo "make_venv.sh: $venv exists; installing into it (remove it to start afresh)"
else
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install "${packages[@]}"
"$venv/bin/python" -m pip freeze > "$venv/pip-freeze.txt"
echo "make_venv.sh: $venv ready; every version in $venv/pip-freeze.txt; the main ones:"
grep -iE '^(torch|numpy|nnunetv2|monai|dynamic[-_]network[-_]architectures|batchgenerators(v2)?)==' \
  "$venv/pip-freeze.txt" || true
