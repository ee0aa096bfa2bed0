"""The atlas's showcase latents, chosen by the build from their top tokens (never by hand), and their checks.

Roles follow the paper's example ("Einstein" -> science + German + famous people): a famous person (or the
famous-person kind), a nationality or country, a science. A latent scores by the share of its top activating
tokens that fall in the role's word list; the best live latent of any width wins (ties: the larger width).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

FAMOUS = frozenset(["einstein", "newton", "darwin", "galileo", "kepler", "copernicus", "faraday", "maxwell", "curie", "pasteur", "freud", "edison", "tesla", "bohr", "planck", "euler", "gauss", "leibniz", "descartes", "pascal", "napoleon", "lincoln", "washington", "jefferson", "churchill", "roosevelt", "bismarck", "caesar", "lenin", "stalin", "marx", "shakespeare", "goethe", "mozart", "beethoven", "bach", "wagner", "luther", "aristotle", "plato", "socrates", "kant", "hegel", "nietzsche", "dante", "milton", "dickens", "voltaire", "rousseau"])
PERSON = FAMOUS | frozenset(["physicist", "chemist", "statesman", "mathematician", "philosopher", "astronomer", "poet", "composer", "painter", "novelist", "dramatist", "scientist", "biologist", "inventor", "sculptor", "economist", "politician", "president", "emperor", "king", "queen"])
NATIONALITY = frozenset(["german", "germany", "french", "france", "english", "england", "british", "britain", "italian", "italy", "spanish", "spain", "russian", "russia", "american", "america", "dutch", "netherlands", "greek", "greece", "roman", "rome", "chinese", "china", "japanese", "japan", "austrian", "austria", "swiss", "switzerland", "swedish", "sweden", "polish", "poland", "scottish", "scotland", "irish", "ireland", "indian", "india", "egyptian", "egypt", "belgian", "belgium", "danish", "denmark", "norwegian", "norway", "portuguese", "portugal", "hungarian", "hungary", "czech", "canadian", "canada", "australian", "australia", "prussian", "prussia"])
SCIENCE = frozenset(["physics", "chemistry", "biology", "mathematics", "science", "sciences", "scientific", "astronomy", "geology", "physicist", "chemist", "biologist", "mathematician", "scientist", "scientists", "theory", "quantum", "relativity", "thermodynamics", "mechanics", "optics", "genetics", "botany", "zoology", "physiology"])
GERMAN = frozenset(["german", "germany", "germans"])
ROLES: dict[str, frozenset[str]] = {"person": PERSON, "nationality": NATIONALITY, "science": SCIENCE}
# what the paper's Einstein meta-latents group: scientists and statesmen
SCIENTIST_OR_STATESMAN = frozenset(["physicist", "chemist", "statesman", "scientist", "mathematician", "astronomer", "biologist", "naturalist", "geologist", "botanist", "zoologist", "physiologist", "physician", "inventor", "economist", "philosopher", "president", "politician", "minister", "chancellor", "senator", "governor", "diplomat", "premier", "emperor", "king"])

# the famous names above that are scientists or statesmen (not the writers, composers and painters)
NAMED_SCIENTIST_OR_STATESMAN = FAMOUS - frozenset(["shakespeare", "goethe", "mozart", "beethoven", "bach", "wagner",
                                                    "luther", "dante", "milton", "dickens", "voltaire", "rousseau"])
_SCI_OR_STATES = SCIENTIST_OR_STATESMAN | NAMED_SCIENTIST_OR_STATESMAN

_WORD = re.compile(r"[a-z]+")


def _words(tokens) -> list[str]:
    out = []
    for t in list(tokens):
        m = _WORD.findall(str(t).lower())
        out.append(m[0] if m else "")
    return out


def role_score(top_tokens, words: frozenset[str], n: int = 8) -> float:
    """Share of the first n top tokens that are words of the role (a word piece of 4+ letters counts when a
    role word other than a name starts with it, so "phys" matches "physics")."""
    toks = _words(list(top_tokens)[:n])
    if not toks:
        return 0.0
    # names match whole words only: "church" is not Churchill
    stems = words - FAMOUS
    hit = sum(1 for t in toks if t in words or (len(t) >= 4 and any(w.startswith(t) for w in stems)))
    return hit / len(toks)


def choose(latents: pd.DataFrame, min_density: float = 1e-4) -> list[dict]:
    """The best latent for each role: {role, width, latent, label, score, why}."""
    live = latents[(latents.density >= min_density) & latents.top_tokens.map(lambda t: len(t) > 0)]
    picks = []
    for role, words in ROLES.items():
        if live.empty:
            break
        score = live.top_tokens.map(lambda t, w=words: role_score(t, w)).to_numpy()
        if role == "person":
            # a named famous person (the paper's "Einstein") beats a latent for an occupation or title
            named = live.top_tokens.map(lambda t: role_score(t, FAMOUS)).to_numpy()
            if named.max() > 0:
                score = named
        if role == "nationality":
            # the paper's example is German: among nationality latents, one that fires on German/Germany first
            german = live.top_tokens.map(lambda t: role_score(t, GERMAN)).to_numpy()
            if german.max() > 0:
                score = np.where(german > 0, score, 0.0)
        order = np.lexsort((-live.density.to_numpy(), -live.sae_width.to_numpy(), -score))
        best = live.iloc[order[0]]
        if score[order[0]] <= 0:
            continue
        toks = [str(t).strip() for t in list(best.top_tokens)[:8]]
        picks.append({"role": role, "width": int(best.sae_width), "latent": int(best.latent),
                      "label": str(best.label), "score": float(score[order[0]]),
                      "why": f"{score[order[0]]:.0%} of its top tokens are {role} words: {', '.join(toks)}"})
    return picks


def check(pick: dict, decomps: list[pd.DataFrame], latents: pd.DataFrame) -> dict:
    """For each meta-SAE seed: the pick's meta-latents and their members that are scientists/statesmen or German.

    Adds `seeds`: per seed, the best count of scientist/statesman members of one of its meta-latents and whether
    one of its meta-latents has a member with Germany/German among its top tokens.
    """
    top = latents.set_index(["sae_width", "latent"]).top_tokens
    out = []
    for d in decomps:
        mine = d[(d.sae_width == pick["width"]) & (d.latent == pick["latent"])].sort_values("rank")
        best_sci, german = 0, False
        for m in mine.meta_latent.tolist():
            members = d[(d.meta_latent == m) & ~((d.sae_width == pick["width"]) & (d.latent == pick["latent"]))]
            words = [set(_words(top.get((w, j), [])[:8])) for w, j in zip(members.sae_width, members.latent,
                                                                          strict=True)]
            # a member counts when its top tokens hold the occupation ("physicist") or a famous scientist's or
            # statesman's name ("Newton", "Lincoln")
            best_sci = max(best_sci, sum(1 for ws in words if ws & _SCI_OR_STATES))
            german = german or any(ws & GERMAN for ws in words)
        out.append({"meta_latents": mine.meta_latent.tolist(), "scientist_members": best_sci, "german_member": german})
    return {**pick, "seeds": out}
