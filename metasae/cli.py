"""The `metasae` command: build, verify, info, push, pull, backend."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metasae.pipeline.config import BuildConfig


def build_config(a: argparse.Namespace) -> BuildConfig:
    """The preset `a` names with the option flags it was given."""
    from metasae.pipeline.config import paths
    from metasae.pipeline.presets import from_preset

    # only the flags given (argparse.SUPPRESS leaves the others out), so `--meta-width none` can set None
    return from_preset(a.preset, {p: getattr(a, p) for p in paths() if p != "preset" and hasattr(a, p)})


def cmd_build(a: argparse.Namespace) -> int:
    from metasae.pipeline.run import build

    cfg = build_config(a)
    work = a.work or str(default_work(a.out))
    build(cfg, a.out, work=work, force=a.force, until=a.until, progress=not a.quiet,
          workers=a.workers or min(4, os.cpu_count() or 1))
    if a.until is None:
        print(f"atlas written to {a.out}")
    return 0


def default_work(out: str) -> Path:
    """Intermediate results live outside the repository (~/.cache/metasae/build/<out name>-<path hash>)."""
    import hashlib

    resolved = Path(out).resolve()
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    root = Path(os.environ.get("METASAE_CACHE", Path.home() / ".cache" / "metasae"))
    return root / "build" / f"{resolved.name}-{tag}"


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser whose ValueError argparse reports as a usage error naming the flag."""

    def read(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return read


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per BuildConfig option, `--<section>-<field>` (`--train-k`), and the flat name it had before the
    sections where that differs (`--k`); so `command_for` output and older command lines both parse."""
    from metasae.pipeline.config import field_type, flag, legacy_flag, parser_for, paths

    groups: dict[str, argparse._ArgumentGroup] = {}
    for path in paths():
        if path == "preset":
            continue
        section = path.split(".")[0] if "." in path else "build"
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} options")
        names = [flag(path)] + [f for f in [legacy_flag(path)] if f]
        groups[section].add_argument(*names, dest=path, type=_arg_type(parser_for(field_type(path))), default=argparse.SUPPRESS,
                       metavar=path.rsplit(".", 1)[-1].upper())


def cmd_verify(a: argparse.Namespace) -> int:
    from metasae.atlas import verify

    problems = verify(a.path, checksums=not a.fast)
    if problems:
        for p in problems:
            print(f"BAD  {p}")
        return 1
    print(f"OK   {a.path}")
    return 0


def _num(x: object, fmt: str, width: int = 0) -> str:
    """A manifest number formatted, or "-" when it is missing or null (NaN is stored as null)."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
    return format(format(x, fmt) if ok else "-", f">{width}")


def cmd_info(a: argparse.Namespace) -> int:
    from metasae.atlas import load_manifest

    m = load_manifest(a.path)
    if a.json:
        print(json.dumps(m.to_dict(), indent=1))
        return 0
    print(f"model   {m.model.name}  hook {m.model.hook}  d_model {m.model.d_model}")
    print(f"corpus  {', '.join(m.corpus.sources)}  {_num(m.corpus.n_tokens, 'd')} tokens")
    print(f"{'width':>7} {'L0':>7} {'MSE':>9} {'FVU':>6} {'CE':>7} {'ΔCE':>7}")
    for s in m.saes:
        print(f"{_num(s.width, 'd', 7)} {_num(s.l0, '.1f', 7)} {_num(s.mse, '.2f', 9)} "
              f"{_num(s.fvu, '.3f', 6)} {_num(s.ce_loss, '.3f', 7)} {_num(s.ce_delta, '.3f', 7)}")
    for p in m.stitching.pairs:
        print(f"pair {p.small}->{p.large}: novel {_num(p.novel_frac, '.1%')}, {_num(p.n_groups, 'd')} groups")
    ms = m.meta_sae
    print(f"meta-SAE {ms.width} meta-latents, k={ms.k}, FVU {_num(ms.fvu, '.3f')}")
    return 0


def cmd_push(a: argparse.Namespace) -> int:
    from metasae.hub import push

    push(a.path, a.repo, private=not a.public)
    print(f"pushed {a.path} to dataset repo {a.repo}")
    return 0


def cmd_pull(a: argparse.Namespace) -> int:
    from metasae.hub import pull

    print(pull(a.repo, revision=a.revision, cache_dir=a.cache_dir))
    return 0


def cmd_backend(a: argparse.Namespace) -> int:
    from metasae.atlas import AtlasError, read_manifest
    from metasae.backend.config import Settings
    from metasae.backend.server import serve

    settings = Settings.from_env(atlas=a.atlas, host=a.host, port=a.port, ray_address=a.ray_address,
                                 device=a.device, idle_timeout_s=a.idle_timeout, preload=a.preload or None)
    _, problems = read_manifest(settings.atlas)  # fail fast on a wrong path; the full open runs in the service
    if problems:
        raise AtlasError("; ".join(problems))
    serve(settings)
    return 0


def _preset_names() -> list[str]:
    from metasae.pipeline.presets import PRESETS

    return list(PRESETS)


def _stage_names() -> list[str]:
    from metasae.pipeline.stages import STAGE_NAMES

    return list(STAGE_NAMES)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metasae", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or resume building) an atlas")
    b.add_argument("--preset", default="demo", choices=_preset_names(), help="named configuration (default demo)")
    b.add_argument("--out", default="data", help="atlas folder to write")
    b.add_argument("--work", help="folder for intermediate results (default ~/.cache/metasae/build/<out name>-<hash>)")
    _add_config_flags(b)
    b.add_argument("--until", choices=_stage_names(), help="stop after this stage")
    b.add_argument("--workers", type=int, default=None,
                   help="single-threaded processes for the activation pass and the ladder (default: cores, at most 4)")
    b.add_argument("--force", action="store_true", help="overwrite an existing atlas / other-settings work")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_build)
    v = sub.add_parser("verify", help="check an atlas: checksums, schema, format_version")
    v.add_argument("path")
    v.add_argument("--fast", action="store_true", help="skip checksums")
    v.set_defaults(fn=cmd_verify)
    i = sub.add_parser("info", help="print an atlas's ladder table")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)
    pu = sub.add_parser("push", help="upload an atlas to the Hugging Face hub as a dataset repo")
    pu.add_argument("path")
    pu.add_argument("repo")
    pu.add_argument("--public", action="store_true")
    pu.set_defaults(fn=cmd_push)
    pl = sub.add_parser("pull", help="download an atlas dataset repo; prints its local path")
    pl.add_argument("repo")
    pl.add_argument("--revision")
    pl.add_argument("--cache-dir")
    pl.set_defaults(fn=cmd_pull)
    be = sub.add_parser("backend", help="serve live encoding, activations and stitching jobs over HTTP "
                                         "(settings also from METASAE_* variables; token from METASAE_TOKEN)")
    be.add_argument("--atlas", help="atlas folder (default: $METASAE_ATLAS or data)")
    be.add_argument("--host", help="interface to bind (default: $METASAE_HOST or 127.0.0.1)")
    be.add_argument("--port", type=int, help="port (default: $METASAE_PORT or 8000)")
    be.add_argument("--ray-address", dest="ray_address",
                    help="Ray cluster for stitching jobs, e.g. auto or ray://head:10001 ($METASAE_RAY_ADDRESS)")
    be.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: $METASAE_DEVICE or auto)")
    be.add_argument("--idle-timeout", dest="idle_timeout", type=float,
                    help="seconds idle before model and SAEs are released (default 600; 0 never)")
    be.add_argument("--preload", action="store_true", help="load model and SAEs at start, not on first need")
    be.set_defaults(fn=cmd_backend)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError) as e:
        print(f"metasae {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - top level: one clear line, not a traceback
        from metasae.atlas import AtlasError

        if isinstance(e, AtlasError):
            print(f"metasae {args.cmd}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
