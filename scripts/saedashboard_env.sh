#!/usr/bin/env bash
# Makes SAEDashboard's own virtual environment at .venv-saedashboard (gitignored) for benchmarks/saedashboard.py.
# SAEDashboard 0.8.0 cannot live in the project's .venv: it wants transformers < 4.57 and transformer-lens < 3.
# Only the package index is used; the benchmark itself runs offline (random-weight HookedTransformer).
# Recipe measured in /work/shared/notes/saedashboard-env.md. Safe to re-run; does nothing already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=${SAEDASHBOARD_ENV:-.venv-saedashboard}
stamp="$ENV/.saedashboard-setup"
want="sae-dashboard==0.8.0 torch==2.13.0 pyarrow<16 safetensors"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$ENV/bin/python" ] || "$PY" -m venv "$ENV"
"$ENV/bin/pip" install -q --upgrade pip
# pyarrow >= 16 wants numpy 2; this stack pins numpy 1.26
"$ENV/bin/pip" install -q sae-dashboard==0.8.0 torch==2.13.0 "pyarrow<16" safetensors
# a torchvision built for another torch breaks `import transformers` models
"$ENV/bin/pip" uninstall -y -q torchvision 2>/dev/null || true
"$ENV/bin/python" -c "import sae_dashboard, transformer_lens, sae_lens; print('saedashboard env ok')"
echo "$want" > "$stamp"
