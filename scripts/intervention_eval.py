"""Knowledge-editing evaluation of the intervention lab: do meta-latent edits change one attribute of an entity
while leaving the other alone, more precisely than ablating the entity's latent?

    python scripts/intervention_eval.py --atlas data --n 40            # writes the section of docs/intervention.md
    python scripts/intervention_eval.py --atlas data --bench-only      # only the latency numbers (docs/benchmarks.md)

People come from WordNet glosses (offline, /usr/share/wordnet: "United States physicist ...", "German composer
..."). For each person, two prompts share the name as prefix: "<name> was born in the country of" (target: the
country of the gloss's nationality) and "<name> worked as a" (target: the gloss's profession). The entity latent
is the latent of the chosen width with the largest activation on the name's last token (among latents of density
< 1%). Edits act where that latent fires: ablate it, or remove one of its meta-latents. For attribute A (the other
is B), drop_A = -Δ log p(A's target) on A's prompt and side_B = |Δ log p(B's target)| on B's prompt; precision =
drop_A / (drop_A + side_B). The meta edit for A is the meta-latent whose removal lowers A's target most (chosen on
drop_A alone, then judged on precision).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metasae.report import EVAL_END as END  # noqa: E402  (after the path insert)
from metasae.report import EVAL_START as START  # noqa: E402
from metasae.report import replace_marked  # noqa: E402

NATIONS = {"United States": " America", "German": " Germany", "French": " France", "English": " England",
           "Italian": " Italy", "Russian": " Russia", "Austrian": " Austria", "Scottish": " Scotland",
           "Spanish": " Spain", "British": " Britain", "Dutch": " Netherlands", "Polish": " Poland",
           "Irish": " Ireland", "Swiss": " Switzerland", "Swedish": " Sweden", "Greek": " Greece"}
JOBS = ("physicist", "chemist", "composer", "painter", "poet", "novelist", "philosopher", "mathematician",
        "astronomer", "writer", "economist", "biologist", "sculptor", "architect", "dramatist", "actor", "singer")
GLOSS = re.compile(r"^\| (" + "|".join(NATIONS) + r")(?:-born)? (?:[a-z]+ )?(" + "|".join(JOBS) + r")\b")


def people(n: int, path: Path = Path("/usr/share/wordnet/data.noun")) -> list[dict]:
    """Instance nouns (lexicographer file 18: people) whose gloss starts '<Nationality> <profession>'."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split(" ")
        if len(parts) < 5 or parts[1] != "18" or parts[2] != "n":
            continue
        k = int(parts[3], 16)
        lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(k)]
        full = [x for x in lemmas if 2 <= len(x.split()) <= 3]
        m = GLOSS.match(line[line.index("| "):]) if "| " in line else None
        if m and full:
            out.append({"name": full[0], "nation": m.group(1), "country": NATIONS[m.group(1)], "job": m.group(2)})
    # spread over nationalities and professions: a deterministic stride through the list
    step = max(1, len(out) // max(n, 1))
    return out[::step][:n]


def entity_latent(setup, ids: list[int], n_name: int, density) -> int:
    import torch

    x = setup.lm.resid(torch.tensor([ids]), setup.hook)[0]
    a = setup.sae.encode(x)[n_name - 1].float().clone()
    a[torch.as_tensor(density >= 0.01)] = 0
    return int(a.argmax())


def evaluate(atlas_path: str, width: int | None, n: int) -> dict:
    import numpy as np
    import torch

    from metasae.atlas import Atlas
    from metasae.backend.endpoints.activations import token_ids
    from metasae.intervene import Edit, Setup, intervene, meta_weights
    from metasae.lm import LanguageModel
    from metasae.sae import Sae

    torch.set_num_threads(1)
    atlas = Atlas.open(atlas_path)
    width = width or atlas.widths[-1]
    lm = LanguageModel.load(atlas.manifest.model.source or "smollm2")
    sae, meta = Sae.load(atlas.sae_path(width)), Sae.load(atlas.meta_sae_path())
    mt = atlas.meta_latents_table(["meta_latent", "label"])
    labels = dict(zip(mt.meta_latent.astype(int), mt.label.fillna(""), strict=True))
    setup = Setup(lm=lm, hook=str(atlas.manifest.model.hook), sae=sae, meta=meta,
                  meta_labels=[labels.get(i, "") for i in range(meta.width)])
    density = atlas.latents_table(width, ["latent", "density"]).sort_values("latent")["density"].to_numpy()
    rows = []
    for p in people(n):
        name_ids = token_ids(lm.tokenizer, p["name"])
        prompts = {"nation": f"{p['name']} was born in the country of", "job": f"{p['name']} worked as a"}
        targets = {"nation": p["country"], "job": " " + p["job"]}
        ids = {a: token_ids(lm.tokenizer, t) for a, t in prompts.items()}
        L = entity_latent(setup, ids["nation"], len(name_ids), density)
        w = meta_weights(meta, sae.W_dec[L])
        metas = [int(m) for m in torch.nonzero(w > 0).flatten()]
        edits = [Edit("ablate")] + [Edit("meta", meta_scales={m: 0.0}) for m in metas]
        res = {a: intervene(setup, ids[a], L, edits, positions="fires", targets=[targets[a]]) for a in prompts}
        d = {a: [e["targets"][0]["delta"] for e in res[a]["edits"]] for a in prompts}
        rows.append({**p, "latent": L, "label": atlas.latent(width, L)["label"], "metas": metas,
                     "meta_labels": [labels.get(m, "") for m in metas], "weights": [float(w[m]) for m in metas],
                     "clean": {a: res[a]["targets"][0]["logp_clean"] for a in prompts}, "delta": d,
                     "n_positions": res["nation"]["edits"][0]["n_positions"]})
        print(f"{p['name']:<28} L={L:<5} abl Δnation {d['nation'][0]:+.3f} Δjob {d['job'][0]:+.3f}", flush=True)
    return {"width": width, "atlas": str(atlas_path), "model": lm.name, "hook": setup.hook, "rows": rows,
            "n_meta": meta.width, "density_limit": 0.01, "_np": np.__version__}


def precision(drop: float, side: float) -> float | None:
    return drop / (drop + side) if drop > 0 else None


def summarise(result: dict) -> dict:
    out = {}
    for a, b in (("nation", "job"), ("job", "nation")):
        abl, met, wins, n = [], [], 0, 0
        for r in result["rows"]:
            da, db = r["delta"][a], r["delta"][b]
            pa = {"drop": -da[0], "side": abs(db[0])}
            abl.append(pa)
            if len(da) > 1:
                j = 1 + max(range(len(da) - 1), key=lambda i: -da[1 + i])  # the meta edit that lowers A most
                pm = {"drop": -da[j], "side": abs(db[j]), "meta": r["metas"][j - 1]}
                met.append(pm)
                p1, p2 = precision(pa["drop"], pa["side"]), precision(pm["drop"], pm["side"])
                if p1 is not None or p2 is not None:
                    n += 1
                    wins += (p2 or 0) > (p1 or 0)
        out[a] = {"ablate": abl, "meta": met, "wins": wins, "n_compared": n}
    return out


def mean(xs: list) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else float("nan")


def render(result: dict) -> str:
    s = summarise(result)
    rows = result["rows"]
    names = {"nation": "birth country", "job": "profession"}
    lines = [START, "", f"Measured with `python scripts/intervention_eval.py --atlas {result['atlas']} --n {len(rows)}`: "
             f"{result['model']} at `{result['hook']}`, the width-{result['width']} SAE and the atlas's meta-SAE "
             f"({result['n_meta']} meta-latents); {len(rows)} people from WordNet glosses. Log-probabilities in nats; "
             "edits where the entity latent fires.", "",
             "| targeted attribute | edit | mean drop of the target | mean change of the other attribute | "
             "mean precision | meta more precise |", "|---|---|---:|---:|---:|---:|"]
    for a in ("nation", "job"):
        for kind in ("ablate", "meta"):
            xs = s[a][kind]
            prec = [precision(x["drop"], x["side"]) for x in xs]
            win = f"{s[a]['wins']} / {s[a]['n_compared']}" if kind == "meta" else ""
            lines.append(f"| {names[a]} | {'ablate the entity latent' if kind == 'ablate' else 'remove its best meta-latent'}"
                         f" | {mean([x['drop'] for x in xs]):+.3f} | {mean([x['side'] for x in xs]):.3f} | "
                         f"{mean(prec):.2f} | {win} |")
    clean_n = mean([r["clean"]["nation"] for r in rows])
    clean_j = mean([r["clean"]["job"] for r in rows])
    lines += ["", f"Clean log-probabilities of the targets: birth country {clean_n:.2f}, profession {clean_j:.2f} "
              f"(mean); the entity latent fired on {mean([r['n_positions'] for r in rows]):.1f} prompt tokens on "
              "average. Precision = drop / (drop + |other change|), averaged where the edit lowered the target."]
    verdict = []
    for a in ("nation", "job"):
        pa = mean([precision(x["drop"], x["side"]) for x in s[a]["ablate"]])
        pm = mean([precision(x["drop"], x["side"]) for x in s[a]["meta"]])
        da, dm = mean([x["drop"] for x in s[a]["ablate"]]), mean([x["drop"] for x in s[a]["meta"]])
        verdict.append(f"for the {names[a]}, removing the best meta-latent is "
                       f"{'more' if pm > pa else 'not more'} precise than ablating the latent "
                       f"({pm:.2f} vs {pa:.2f}) and moves the target {'less' if dm < da else 'more'} ({dm:+.3f} vs "
                       f"{da:+.3f})")
    lines += ["", "**Verdict on this model:** " + "; ".join(verdict) + ". The meta-latent is chosen per person as the "
              "one that lowers the target most, a selection the single ablation does not get; the effects are small "
              "because a 135M model puts little probability on these facts to begin with."]
    ex = max(rows, key=lambda r: r["clean"]["nation"] + r["clean"]["job"]) if rows else None
    if ex:
        lines += ["", f"**Worked example: {ex['name']}** ({ex['nation']} {ex['job']}). Entity latent "
                  f"{result['width']}/{ex['latent']} ({ex['label']!r}); its meta-latents: "
                  + ", ".join(f"{m} {lab!r} ({w:.2f})" for m, lab, w in
                              zip(ex["metas"], ex["meta_labels"], ex["weights"], strict=True)) + ".", "",
                  f"| edit | Δ log p({ex['country']!r}) after 'was born in the country of' | "
                  f"Δ log p({' ' + ex['job']!r}) after 'worked as a' |", "|---|---:|---:|"]
        names_e = ["ablate the latent"] + [f"remove meta {m}" for m in ex["metas"]]
        for i, nm in enumerate(names_e):
            lines.append(f"| {nm} | {ex['delta']['nation'][i]:+.3f} | {ex['delta']['job'][i]:+.3f} |")
        lines += ["", f"Clean: {ex['clean']['nation']:.2f} and {ex['clean']['job']:.2f}."]
    lines += ["", END]
    return "\n".join(lines)


def bench(atlas_path: str, reps: int = 20) -> dict:
    """p50/p95 of intervene() on a 32-token prompt: one ablation, and the lab's three edits (+16-token continuation)."""
    import torch

    from metasae.atlas import Atlas
    from metasae.intervene import Edit, Setup, intervene, meta_weights
    from metasae.lm import LanguageModel
    from metasae.sae import Sae

    torch.set_num_threads(1)
    atlas = Atlas.open(atlas_path)
    width = atlas.widths[-1]
    lm = LanguageModel.load(atlas.manifest.model.source or "smollm2")
    sae, meta = Sae.load(atlas.sae_path(width)), Sae.load(atlas.meta_sae_path())
    setup = Setup(lm=lm, hook=str(atlas.manifest.model.hook), sae=sae, meta=meta)
    text = "Albert Einstein was a German-born theoretical physicist who developed the theory of relativity, one " * 3
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:32]
    L = int(sae.encode(lm.resid(torch.tensor([ids]), setup.hook)[0])[-1].argmax())
    m = int(meta_weights(meta, sae.W_dec[L]).argmax())
    cases = {"one ablation": ([Edit("ablate")], 0),
             "lab: ablate + remove one meta + sliders": ([Edit("ablate"), Edit("meta", meta_scales={m: 0.0}),
                                                          Edit("meta", meta_scales={m: 0.5})], 0),
             "lab + 16-token continuations": ([Edit("ablate"), Edit("meta", meta_scales={m: 0.0})], 16)}
    out = {"width": width, "n_tokens": len(ids), "reps": reps, "threads": torch.get_num_threads()}
    for name, (edits, gen) in cases.items():
        intervene(setup, ids, L, edits, targets=[" physics"], max_new_tokens=gen)  # warm
        times = []
        for _ in range(reps if not gen else max(3, reps // 5)):
            t = time.perf_counter()
            intervene(setup, ids, L, edits, targets=[" physics"], max_new_tokens=gen)
            times.append(time.perf_counter() - t)
        times.sort()
        out[name] = {"p50_ms": 1000 * times[len(times) // 2],
                     "p95_ms": 1000 * times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)], "n": len(times)}
        print(name, out[name], flush=True)
    return out


def write_section(path: Path, text: str) -> None:
    doc = path.read_text(encoding="utf-8") if path.exists() else ""
    new = replace_marked(doc, START, END, text)
    path.write_text(new if new is not None else doc.rstrip("\n") + "\n\n" + text + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--atlas", default=str(ROOT / "data"))
    ap.add_argument("--width", type=int, default=None, help="SAE width of the entity latents (default: the largest)")
    ap.add_argument("--n", type=int, default=40, help="people from WordNet")
    ap.add_argument("--out", default=str(ROOT / "docs" / "intervention.md"))
    ap.add_argument("--json", default=None, help="also save the raw results here")
    ap.add_argument("--bench", action="store_true", help="also time intervene() (printed as JSON)")
    ap.add_argument("--bench-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.bench_only:
        result = evaluate(args.atlas, args.width, args.n)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
        write_section(Path(args.out), render(result))
        print(f"wrote {args.out}")
    if args.bench or args.bench_only:
        print(json.dumps(bench(args.atlas), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
