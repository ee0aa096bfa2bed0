"""Write (or check) docs/openapi.json: the contract a backend for the bundled atlas publishes with a token set.

    python scripts/openapi.py            # regenerate docs/openapi.json
    python scripts/openapi.py --check    # exit 1 when docs/openapi.json differs from what the code generates

The document is FastAPI's, generated from the pydantic models (metasae.backend.schemas) for the atlas's widths,
d_model and ctx_len; tests/backend/test_openapi.py fails when the committed file drifts, so a rebuild of data/
that changes those (or a change to a route) is committed with this script's output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metasae.backend.app import openapi_contract  # noqa: E402

OUT = ROOT / "docs" / "openapi.json"


def render(atlas: Path = ROOT / "data") -> str:
    """The document as committed: sorted keys, two-space indent, trailing newline."""
    return json.dumps(openapi_contract(str(atlas), token=True), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", type=Path, default=ROOT / "data", help="atlas whose manifest the contract is for")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    a = p.parse_args(argv)
    if not (a.atlas / "manifest.json").is_file():  # else the contract would silently lose the atlas's enums
        print(f"{a.atlas}: no manifest.json (no atlas there)", file=sys.stderr)
        return 2
    text = render(a.atlas)
    if a.check:
        same = a.out.is_file() and a.out.read_text(encoding="utf-8") == text
        print(f"{a.out}: {'up to date' if same else 'differs: run python scripts/openapi.py'}")
        return 0 if same else 1
    a.out.write_text(text, encoding="utf-8")
    print(f"wrote {a.out} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
