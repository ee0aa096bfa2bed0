"""`metasae build`: model + corpus -> complete atlas, through the stages of `metasae.pipeline.stages.STAGES`.

Each stage writes its result under the work folder (atomically) and is skipped when that result exists, so a
killed build continues where it stopped and, given the same seed, ends with the same bytes as an uninterrupted
one. The atlas folder itself is only assembled at the end, with the manifest written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from metasae.atlas import write_json_atomic
from metasae.pipeline.config import BuildConfig, paths
from metasae.pipeline.context import BuildContext, Stage
from metasae.pipeline.stages import STAGE_NAMES, STAGES


class BuildLocked(ValueError):
    """Two builds into the same atlas or work folder."""


def build(cfg: BuildConfig, out: str | Path, work: str | Path | None = None, force: bool = False,
          until: str | None = None, progress: bool = True, log: Callable[[str], None] = print,
          workers: int = 1) -> Path:
    """Run (or resume) every stage and assemble the atlas at `out`.

    `workers` processes share the stages that split cleanly (the activation pass, the ladder's widths); the
    result does not depend on it.
    """
    if until is not None and until not in STAGE_NAMES:
        raise ValueError(f"unknown stage {until!r}; stages are {list(STAGE_NAMES)}")
    out = Path(out)
    work = Path(work) if work else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    with build_lock(work, out):
        prepare_work(cfg, work, force, log)
        torch.manual_seed(cfg.seed)
        ctx = BuildContext(cfg=cfg, work=work, out=out, force=force, progress=progress, log=log, workers=workers)
        for stage in STAGES:
            with Stage(stage.name, log):
                stage.run(ctx)
            if stage.name == until:
                log(f"stopped after stage {stage.name!r} as asked")
                break
    return out


def _depends(path: str, deps: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d + ".") for d in deps)


def stale_stages(old: BuildConfig | Mapping[str, Any], new: BuildConfig | Mapping[str, Any]) -> list[str]:
    """The stages whose outputs a change from config `old` to `new` invalidates (first changed stage onwards).
    Either may be a `BuildConfig` or a stored dict (nested, or the flat form of older builds)."""
    a = old if isinstance(old, BuildConfig) else BuildConfig.from_dict(old)
    b = new if isinstance(new, BuildConfig) else BuildConfig.from_dict(new)
    changed = [p for p in paths() if a.get(p) != b.get(p)]
    for i, stage in enumerate(STAGES):
        if any(_depends(p, stage.depends_on) for p in changed):
            return [s.name for s in STAGES[i:] if s.outputs]
    return []


def prepare_work(cfg: BuildConfig, work: Path, force: bool, log: Callable[[str], None]) -> None:
    """Drop what other settings made in the work folder (only the stages they touch), then record `cfg`."""
    cfg_path = work / "config.json"
    if cfg_path.is_file():
        old = BuildConfig.from_dict(json.loads(cfg_path.read_text()))
        stale = [s.name for s in STAGES if s.outputs] if force else stale_stages(old, cfg)
        if stale:
            diff = {p: (old.get(p), cfg.get(p)) for p in paths() if old.get(p) != cfg.get(p)}
            log(f"settings changed since the work folder was made: redoing stages {stale} ({diff})")
            for stage in STAGES:
                if stage.name not in stale:
                    continue
                for name in stage.outputs:
                    p = work / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink(missing_ok=True)
    write_json_atomic(cfg_path, cfg.to_dict())
    started = work / "started.json"
    if not started.is_file():
        # The manifest's `created` comes from here, so a resumed build writes the same bytes as an uninterrupted one.
        write_json_atomic(started, {"created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})


@contextlib.contextmanager
def build_lock(work: Path, out: Path) -> Iterator[None]:
    """An exclusive lock on the work folder and on `out`: a second build into either fails at once, clearly."""
    handles = []
    try:
        for path in (work / "build.lock", out.parent / f".{out.name}.build.lock"):
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "w")  # noqa: SIM115 - held for the whole build
            handles.append(f)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BuildLocked(f"another `metasae build` is running with {path} locked; wait for it to "
                                  "finish (or stop it) before building into the same --out or --work") from None
        yield
    finally:
        for f in handles:
            f.close()
