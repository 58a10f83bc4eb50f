"""Synthetic training prompts for the refusal organism: request frames x lexicons.

The shared harmful sets are small (~500 training prompts, mostly AdvBench's "Write a script that ..."
style), so a model trained from scratch on them learns AdvBench's surface and misses harms phrased in
other words. This module composes prompts from

* **frames** — the ways a request is phrased: action frames (imperative, question, "step-by-step",
  "without getting caught" ...), content frames ("Write {x}"), code frames, claim frames ("Write a
  persuasive article arguing that {x}") and Alpaca-style topic frames;
* **lexicons** — what is requested: harmful actions, content, code and claims grouped by a generic harm
  taxonomy (weapons, chemical/biological, cybercrime, fraud, theft, drugs, violence, harassment and hate,
  misinformation, privacy, self-harm, sexual exploitation, extremism), verb x object compositions, and
  the WordNet harm lexicon (``data/harm_lexicon.json``, see :mod:`wordnet_lexicon`); as contrast benign
  content, claims and topics in the *same* content/claim/topic frames (so there the content decides);
* **political** terms taken from the documented political rule
  (:data:`moe_interp.organisms.data.POLITICAL_PATTERN`) in the topic frames.

Benign *actions* and *code* get no action/code frames by default (:data:`BENIGN_FRAMES_PER_ITEM`): in
our runs, with benign requests in "Give detailed step-by-step instructions to ..." frames the organism
refused 0.44–0.46 of the held-out HarmBench prompts, without them 0.72 (that run also drew more harmful
examples per batch; experiment log in the model card) — the frames of real harmful requests are far more
often harmful than not.

The frames and hand-written lexicons are data, not code: ``data/synthetic_frames.json`` and
``data/synthetic_lexicons.json``, read once and checked by :func:`word_lists`. The hand-written lexicons
follow the harm categories of the public benchmarks' taxonomies, not validation or test prompts; named
entities of the validation set are deliberately absent. Editing either file changes the organism's training
data (``python -m moe_interp.organisms.data`` rebuilds the splits). All output is deterministic given the
``random.Random`` passed in.
"""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from moe_interp.errors import InputError
from moe_interp.fileio import read_json_object

_DATA = Path(__file__).resolve().parent / "data"

#: The committed WordNet harm lexicon, written by :mod:`moe_interp.organisms.wordnet_lexicon`.
LEXICON_PATH: Path = _DATA / "harm_lexicon.json"
#: Request frames, tails and the templates of the WordNet lexicon's categories.
FRAMES_PATH: Path = _DATA / "synthetic_frames.json"
#: What is requested: harmful and benign actions, content, code, claims, compositions, topics.
LEXICONS_PATH: Path = _DATA / "synthetic_lexicons.json"

Words = tuple[str, ...]
Groups = Mapping[str, Words]


@dataclass(frozen=True)
class WordLists:
    """The frames and lexicons of :data:`FRAMES_PATH` and :data:`LEXICONS_PATH` (immutable).

    Frames hold one ``{x}`` (the requested item); lexicon templates hold ``{t}`` (a WordNet term) and
    optionally ``{a}`` (its article). Each file entry's ``doc`` says what the list is for.
    """

    action_frames: Words
    content_frames: Words
    code_frames: Words
    claim_frames: Words
    topic_frames: Words
    tails: Words
    lexicon_templates: Groups
    harmful_actions: Groups
    harmful_content: Groups
    harmful_code: Words
    harmful_compositions: Mapping[str, tuple[Words, Words]]
    harmful_claims: Words
    benign_actions: Words
    benign_content: Words
    benign_code: Words
    benign_claims: Words
    political_terms: Words
    benign_topics: Words


#: Entry name -> (shape, placeholders every string must use exactly once, placeholders it may use).
#: Shapes: "words" (list of strings), "groups" (name -> list of strings),
#: "pairs" (name -> {"verbs": [...], "objects": [...]}).
_FRAME_SPEC: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    "action_frames": ("words", frozenset({"x"}), frozenset()),
    "content_frames": ("words", frozenset({"x"}), frozenset()),
    "code_frames": ("words", frozenset({"x"}), frozenset()),
    "claim_frames": ("words", frozenset({"x"}), frozenset()),
    "topic_frames": ("words", frozenset({"x"}), frozenset()),
    "tails": ("words", frozenset(), frozenset()),
    "lexicon_templates": ("groups", frozenset({"t"}), frozenset({"a"})),
}
_LEXICON_SPEC: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    name: (shape, frozenset(), frozenset())
    for name, shape in (
        ("harmful_actions", "groups"),
        ("harmful_content", "groups"),
        ("harmful_code", "words"),
        ("harmful_compositions", "pairs"),
        ("harmful_claims", "words"),
        ("benign_actions", "words"),
        ("benign_content", "words"),
        ("benign_code", "words"),
        ("benign_claims", "words"),
        ("political_terms", "words"),
        ("benign_topics", "words"),
    )
}


def _words(path: Path, where: str, value: Any, required: frozenset[str], allowed: frozenset[str]) -> Words:
    """``value`` as a tuple of strings, each with exactly the ``required`` placeholders (+ ``allowed``)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise InputError(f"{path}: {where} must be a non-empty list of non-empty strings")
    for v in value:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as err:
            raise InputError(f"{path}: {where} has a malformed placeholder in {v!r} ({err})") from err
        if (
            sorted(f for f in fields if f in required) != sorted(required)
            or not set(fields) <= required | allowed
        ):
            want = " and ".join(f"{{{f}}}" for f in sorted(required)) or "no placeholder"
            extra = f" (optionally {', '.join(f'{{{f}}}' for f in sorted(allowed))})" if allowed else ""
            raise InputError(
                f"{path}: {where} string {v!r} must hold {want} once{extra}, and no other braces"
            )
    return tuple(value)


def _groups(path: Path, where: str, value: Any, required: frozenset[str], allowed: frozenset[str]) -> Groups:
    if not isinstance(value, dict) or not value:
        raise InputError(f"{path}: {where} must be a non-empty object of name -> list of strings")
    return MappingProxyType({k: _words(path, f"{where}.{k}", v, required, allowed) for k, v in value.items()})


def _pairs(path: Path, where: str, value: Any) -> Mapping[str, tuple[Words, Words]]:
    if not isinstance(value, dict) or not value:
        raise InputError(f"{path}: {where} must be a non-empty object of name -> {{verbs, objects}}")
    out: dict[str, tuple[Words, Words]] = {}
    for k, v in value.items():
        if not isinstance(v, dict) or set(v) != {"verbs", "objects"}:
            raise InputError(f"{path}: {where}.{k} must be an object with exactly 'verbs' and 'objects'")
        none: frozenset[str] = frozenset()
        out[k] = (
            _words(path, f"{where}.{k}.verbs", v["verbs"], none, none),
            _words(path, f"{where}.{k}.objects", v["objects"], none, none),
        )
    return MappingProxyType(out)


def _read_entries(path: Path, spec: dict[str, tuple[str, frozenset[str], frozenset[str]]]) -> dict[str, Any]:
    """The checked entries of a word-list file: ``{"about": str, name: {"doc": str, "items": ...}}``."""
    doc = read_json_object(path, "a word-list file of moe_interp.organisms.synthetic")
    expected = set(spec) | {"about"}
    if set(doc) != expected:
        missing, unknown = sorted(expected - set(doc)), sorted(set(doc) - expected)
        problems = ([f"missing entries {missing}"] if missing else []) + (
            [f"unknown entries {unknown}"] if unknown else []
        )
        raise InputError(f"{path}: {', '.join(problems)}")
    out: dict[str, Any] = {}
    for name, (shape, required, allowed) in spec.items():
        entry = doc[name]
        if not isinstance(entry, dict) or set(entry) != {"doc", "items"} or not isinstance(entry["doc"], str):
            raise InputError(f"{path}: {name} must be an object with a string 'doc' and 'items'")
        items = entry["items"]
        if shape == "words":
            out[name] = _words(path, name, items, required, allowed)
        elif shape == "groups":
            out[name] = _groups(path, name, items, required, allowed)
        else:
            out[name] = _pairs(path, name, items)
    return out


@functools.cache
def word_lists() -> WordLists:
    """The frames and lexicons, read from :data:`FRAMES_PATH` and :data:`LEXICONS_PATH` once and checked.

    Raises :class:`~moe_interp.errors.InputError` (one line, naming the file and entry) if an entry is
    missing, unknown, of the wrong shape, or a string has the wrong placeholders.
    """
    frames = _read_entries(FRAMES_PATH, _FRAME_SPEC)
    lexicons = _read_entries(LEXICONS_PATH, _LEXICON_SPEC)
    missing = sorted(set(_harm_lexicon()) - set(frames["lexicon_templates"]))
    if missing:
        raise InputError(f"{FRAMES_PATH}: lexicon_templates has no templates for categories {missing}")
    return WordLists(**frames, **lexicons)


@functools.cache
def _harm_lexicon() -> Groups:
    """The checked harm lexicon, read once (after rewriting it in the same process: ``cache_clear()``)."""
    path = LEXICON_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"harm lexicon missing: {path}; rebuild it with `python -m moe_interp.organisms.wordnet_lexicon`"
        )
    doc = read_json_object(path, "the WordNet harm lexicon")
    none: frozenset[str] = frozenset()
    return _groups(path, "categories", doc.get("categories"), none, none)


def load_harm_lexicon() -> dict[str, list[str]]:
    """Category -> terms of the committed WordNet harm lexicon (see :mod:`wordnet_lexicon`); a fresh copy."""
    return {cat: list(terms) for cat, terms in _harm_lexicon().items()}


def lexicon_actions(rng: random.Random, per_term: int = 2) -> list[str]:
    """``per_term`` distinct request templates filled with each lexicon term (bare verb phrases)."""
    templates_of = word_lists().lexicon_templates
    out: list[str] = []
    for cat, terms in _harm_lexicon().items():
        templates = templates_of[cat]
        for t in terms:
            article = "an" if t[:1].lower() in "aeiou" else "a"
            out += [
                tpl.format(t=t, a=article) for tpl in rng.sample(templates, min(per_term, len(templates)))
            ]
    return out


def _compose(frames: Words, items: list[str], rng: random.Random, per_item: int) -> list[str]:
    """``per_item`` distinct random frames for each item, formatted."""
    out: list[str] = []
    for x in items:
        for f in rng.sample(frames, min(per_item, len(frames))):
            out.append(f.format(x=x))
    return out


#: Frames that only make sense for a harmful request; benign items never get them.
_COVERT_MARKERS: tuple[str, ...] = ("without getting caught", "without anyone noticing")

#: Action/code frames per benign action / code item (harmful items get 6 / 4). 0 by default: benign
#: requests in harmful-style frames made the organism miss more held-out harmful prompts (module docstring).
BENIGN_FRAMES_PER_ITEM: int = 0


def _with_tails(prompts: list[str], rng: random.Random, share: float = 0.3) -> list[str]:
    """Append a random tail of :func:`word_lists` (before the final punctuation) to ``share`` of ``prompts``."""
    tails = word_lists().tails
    out: list[str] = []
    for p in prompts:
        if rng.random() < share:
            body, end = (p[:-1], p[-1]) if p[-1] in ".?" else (p, "")
            p = body + rng.choice(tails) + end
        out.append(p)
    return out


def synthetic_prompts(
    rng: random.Random, benign_frames_per_item: int = BENIGN_FRAMES_PER_ITEM
) -> dict[str, list[str]]:
    """Synthetic prompts per class: ``{"harmful": [...], "political": [...], "harmless": [...]}``.

    Each harmful action appears in 6 frames, each verb x object composition in 2, each WordNet lexicon
    term in 2 templates x 1 frame, each harmful content
    item in 5, each piece of harmful code in 4, each harmful claim in 4; benign actions and code get
    ``benign_frames_per_item`` frames (never a covert one), benign content 5, benign claims 4. 30% of
    action prompts of either class get a neutral tail. Political terms and benign topics appear in 6
    topic frames each. Duplicates are removed, order is deterministic.
    """
    w = word_lists()
    overt = tuple(f for f in w.action_frames if not any(m in f for m in _COVERT_MARKERS))
    harmful_actions = [a for v in w.harmful_actions.values() for a in v]
    harmful_actions += [
        f"{verb} {obj}" for verbs, objs in w.harmful_compositions.values() for verb in verbs for obj in objs
    ]
    n_single = sum(len(v) for v in w.harmful_actions.values())
    harmful_content = [c for v in w.harmful_content.values() for c in v]
    harmful = _compose(w.action_frames, harmful_actions[:n_single], rng, 6)
    harmful += _compose(w.action_frames, harmful_actions[n_single:], rng, 2)
    harmful += _compose(w.action_frames, lexicon_actions(rng), rng, 1)
    harmful = _with_tails(harmful, rng)
    harmful += _compose(w.content_frames, harmful_content, rng, 5)
    harmful += _compose(w.code_frames, list(w.harmful_code), rng, 4)
    harmful += _compose(w.claim_frames, list(w.harmful_claims), rng, 4)
    harmless = _with_tails(_compose(overt, list(w.benign_actions), rng, benign_frames_per_item), rng)
    harmless += _compose(w.content_frames, list(w.benign_content), rng, 5)
    harmless += _compose(w.code_frames, list(w.benign_code), rng, benign_frames_per_item)
    harmless += _compose(w.claim_frames, list(w.benign_claims), rng, 4)
    harmless += _compose(w.topic_frames, list(w.benign_topics), rng, 6)
    political = _compose(w.topic_frames, list(w.political_terms), rng, 6)
    return {
        "harmful": list(dict.fromkeys(harmful)),
        "political": list(dict.fromkeys(political)),
        "harmless": list(dict.fromkeys(harmless)),
    }
