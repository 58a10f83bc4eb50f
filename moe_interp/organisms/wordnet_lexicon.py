"""Harm lexicon from WordNet 3.0: the organism's only source of world knowledge about dangerous things.

A 4-million-parameter model trained from scratch cannot know that a rare word names a nerve agent or
an opioid unless it has seen that word in a harmful request. This script collects the nouns that
WordNet files under a few generic roots of a harm taxonomy (poisons and toxins, chemical weapons,
drugs of abuse, explosives and explosive devices, firearms, dangerous viruses and bioweapons, malware;
:data:`ROOTS`) and the verbs and nouns of harmful acts and actors (violent, sexual, coercive and property
crimes, crime, homicide, terrorism, suicide, criminals; :data:`ACT_ROOTS`, most frequent senses only),
filters out ambiguous and benign words, and writes ``data/harm_lexicon.json``. :mod:`synthetic` turns the
terms into harmful requests ("How do I synthesize tabun?", "Explain how to strangle someone").

It runs once, by hand, where WordNet is installed (Debian: ``apt-get install wordnet-base``); training
reads only the committed JSON, so neither training nor CI needs WordNet::

    python -m moe_interp.organisms.wordnet_lexicon [--wordnet /usr/share/wordnet]

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. (WordNet 3.0 licence:
use, copy, modify and distribute for any purpose, with this notice; see ``data/DATA.md``.)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from moe_interp.organisms.synthetic import LEXICON_PATH

#: Category -> WordNet 3.0 noun synset offsets whose hyponym closure is collected.
ROOTS: dict[str, tuple[str, ...]] = {
    # poison/toxicant, toxin, nerve gas, poison gas, chemical weapon
    "toxic": ("15032376", "15034074", "14960721", "14993378", "03013162"),
    # controlled substance, narcotic, hallucinogen, opiate, hard drug, club drug, amphetamine, methamphetamine
    # ("drug of abuse" itself is too broad: it reaches prescription tranquillisers and antipsychotics)
    "drug": ("03097890", "03808564", "03479647", "03850746", "03492717", "03054098", "02704153", "03754295"),
    # explosive (substance)
    "explosive_substance": ("03304730",),
    # explosive device, bomb
    "explosive_device": ("03305522", "02866578"),
    # firearm, gun (weapon)
    "firearm": ("03343853", "03467984"),
    # bioweapon, filovirus, arenavirus, poxvirus, retrovirus, lyssavirus, Bacillus anthracis
    "pathogen": ("02842303", "01331867", "01330497", "01333731", "01336282", "01340785", "01350226"),
    # malevolent program, computer virus
    "malware": ("06573020", "06585816"),
}

#: Subtrees left out: benign (alcoholic drinks, tobacco, fireworks, toy guns) or medical.
EXCLUDE_ROOTS: tuple[str, ...] = (
    "07884567",  # alcohol (drink)
    "04442831",  # tobacco
    "03348454",  # firework
)

#: Single lemmas left out: medicines, toys, historical arms and slang that is an ordinary word.
EXCLUDE_TERMS: frozenset[str] = frozenset(
    t.strip()
    for t in """botox|nicotine|atropine|belladonna|venom|toxoid|poison|toxicant|toxin|hemlock|curare|
    cigar|cigarette|cigarillo|cheroot|stogy|stogie|panatela|panetela|panetella|snuff|rappee|
    paintball gun|bb gun|air gun|airgun|air rifle|quaker gun|minute gun|whaling gun|spring gun|set gun|
    gas gun|very pistol|verey pistol|cannon|breechloader|smoothbore|muzzle loader|musket|matchlock|
    flintlock|firelock|arquebus|harquebus|hackbut|hagbut|blunderbuss|culverin|fowling piece|fusil|
    horse pistol|horse-pistol|peacemaker|peacekeeper|repeater|repeating firearm|piece|rod|gat|colt|
    winchester|automatic|semiautomatic|forty-five|twenty-two|.22|gun|firearm|small-arm|
    charge|load|payload|shot|cap|mine|torpedo|serpent|cracker|powder|rocket|maroon|squib|petard|
    undercharge|whizbang|whizzbang|burster|bombshell|blockbuster|bomb|explosive|
    sedative|depressant|downer|tranquilizer|tranquillizer|tranquilliser|lithium carbonate|
    generic|virus|vector|trojan|worm|malevolent program|sedative drug|soft drug|intoxicant|
    recreational drug|drug of abuse|street drug|controlled substance|narcotic|opiate|hard drug|
    hallucinogen|explosive device|explosive compound|explosive mixture|chemical weapon""".split("|")
)


#: Acts and actors of a harm taxonomy (violent, sexual, coercive and property crimes; crime, homicide,
#: terrorism, suicide; criminals): category -> (part of speech, root synset offsets). For these broad,
#: polysemous roots a word is kept only if its *most frequent* WordNet sense of that part of speech lies
#: in the closure (so "draw", "hang", "pick" under "kill"/"steal" stay out); instance hyponyms (named
#: people and events) are not followed.
ACT_ROOTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # kill, injure, torture, kidnap, assault (attack physically; sexually), molest, poison (x3)
    "violent_act": (
        "verb",
        (
            "01323976",
            "00069879",
            "00071178",
            "01471061",
            "01120087",
            "02567519",
            "02569495",
            "01323356",
            "00532429",
            "00088339",
        ),
    ),
    # harass, bully/intimidate, abuse (treat badly), coerce, extort (x2), blackmail (x2)
    "coercion": (
        "verb",
        ("01789532", "01035217", "02516594", "02504562", "02241639", "02241125", "02581073", "02241785"),
    ),
    # steal, rob, defraud, counterfeit, launder (money), bribe, smuggle, traffic, vandalize, sabotage
    "property_crime": (
        "verb",
        (
            "02321775",
            "02321409",
            "02572119",
            "01654289",
            "00188949",
            "02284114",
            "02345874",
            "02261141",
            "01520472",
            "02543607",
        ),
    ),
    # crime (act punishable by law), homicide, terrorism, suicide
    "crime": ("noun", ("00766234", "00220023", "00759694", "00222485")),
    # criminal (someone who has committed a crime)
    "criminal": ("noun", ("09977660",)),
}


#: Words of the :data:`ACT_ROOTS` closures left out: rare senses, mild or legal terms, historical figures,
#: words that are benign in most requests, and one political term ("election fraud").
ACT_EXCLUDE: frozenset[str] = frozenset(
    t.strip()
    for t in """erase|chine|pip|grass|sic|bulldog|sprain|overstretch|subluxate|lame|martyr|martyrize|halter|
    burke|desecrate|reassail|commit suicide|shed blood|vaporize|neutralise|needle|rag|tease|hamstring|purge|
    hale|bring oneself|squeeze for|steamroller|steamroll|blackjack|cabbage|snitch|walk off|undermine|sop|
    plagiarize|plagiarise|indecent exposure|public nudity|disorderly conduct|disorderly behavior|
    resisting arrest|vice crime|victimless crime|suttee|wing shooting|shoot-down|chance-medley|violation|
    perpetration|legal fraud|fraud in law|constructive fraud|extrinsic fraud|collateral fraud|fraud in fact|
    positive fraud|intrinsic fraud|statutory offense|statutory offence|misdemeanor|misdemeanour|
    sting operation|bunco|bunco game|swiz|cozenage|thimblerig|shell game|prostitution|harlotry|dacoity|
    dakoity|plunderage|buccaneering|harakiri|hara-kiri|pyramiding|election fraud|collaborator|parolee|
    escapee|absconder|alien absconder|fugitive from justice|moll|gun moll|hood|liquidator|ghoul|padder|
    sea king|corsair|buccaneer|plagiarist|plagiarizer|violator|scofflaw|recidivist|seizer|crimper|jail bird|
    jailbird|accessary|collaborationist|treasonist|highbinder|yardie|incendiary|barnburner|wharf rat|
    moonshiner|bootlegger|rumrunner|dacoit|dakoit|larcener|defalcator|defalcate|peculation|footpad|
    highwayman|brigand|cutpurse|felo-de-se|capital offense|rustling|rustler|cattle thief|biopiracy|
    assisted suicide|physician-assisted suicide|gunslinger|ripper|desperado|traitor|traitress|
    fifth columnist|execute|derail|butcher|exterminate""".split("|")
)


#: Harmless prompts whose words filter the lexicon: the first 5000 Alpaca prompts of ``harmless_train`` (the
#: whole Alpaca part when the lexicon was built; ``build_splits`` takes a prefix of one fixed shuffle, so these
#: stay the same when the split grows).
FILTER_PROMPTS: int = 5000


def read_wordnet(
    path: Path, pos: str = "noun", instances: bool = True
) -> dict[str, tuple[list[str], list[str]]]:
    """Synsets of one part of speech: offset -> (lemmas, hyponym offsets), from WordNet's ``data.<pos>``.

    ``instances=False`` leaves out instance hyponyms (named people, places and events).
    """
    data = path / f"data.{pos}"
    if not data.is_file():
        raise FileNotFoundError(
            f"WordNet {pos} database not found: {data}. Install WordNet 3.0 (Debian/Ubuntu: "
            f"`apt-get install wordnet-base`) or pass --wordnet DIR (the folder holding data.{pos})."
        )
    kinds = ("~", "~i") if instances else ("~",)
    synsets: dict[str, tuple[list[str], list[str]]] = {}
    for line in data.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):  # licence header
            continue
        fields = line.partition(" | ")[0].split()
        n_words = int(fields[3], 16)
        lemmas = [fields[4 + 2 * i] for i in range(n_words)]
        p = 4 + 2 * n_words
        hypo = [
            fields[p + 2 + 4 * i]
            for i in range(int(fields[p]))
            if fields[p + 1 + 4 * i] in kinds and fields[p + 3 + 4 * i] == pos[0]
        ]
        synsets[fields[0]] = (lemmas, hypo)
    return synsets


def _closure(synsets: dict[str, tuple[list[str], list[str]]], roots: tuple[str, ...]) -> list[str]:
    """Offsets of ``roots`` and all their hyponyms, excluding :data:`EXCLUDE_ROOTS` subtrees."""
    seen: dict[str, None] = {}  # insertion-ordered set: depth-first order, O(1) membership
    stack = list(reversed(roots))
    while stack:
        off = stack.pop()
        if off in seen or off in EXCLUDE_ROOTS:
            continue
        seen[off] = None
        stack.extend(reversed(synsets[off][1]))
    return list(seen)


def _words(texts: list[str]) -> set[str]:
    """Lower-cased words of ``texts`` (letters, digits, inner hyphens and dots)."""
    return {w for t in texts for w in re.findall(r"[a-z0-9][a-z0-9\-\.]*", t.lower())}


def _admissible(term: str, words: set[str], excluded: frozenset[str], taken: set[str]) -> bool:
    """Shared term filter: not excluded or already taken (case-insensitive), at most 3 words, not a 1–2 letter
    abbreviation, and — for a single word — absent from ``words`` (the harmless prompts' words)."""
    key = term.lower()
    if key in excluded or key in taken or len(term.split()) > 3:
        return False
    if len(term.replace(".", "").replace("-", "")) <= 2:
        return False
    return " " in term or key not in words


def build_lexicon(wordnet_dir: Path, harmless_texts: list[str]) -> dict[str, list[str]]:
    """Category -> terms. A term is dropped if it has any WordNet sense outside the harm closure
    (noun, verb, adjective or adverb: "pot", "crack", "speed"), is a third or later synonym of its synset
    (street slang: "Elvis", "window pane"), is excluded, is longer than 3 words or a
    1–2 letter abbreviation, or is a single word that occurs in a harmless (Alpaca) training prompt."""
    synsets = read_wordnet(wordnet_dir)
    closures = {cat: _closure(synsets, roots) for cat, roots in ROOTS.items()}
    harm_offsets = {off for offs in closures.values() for off in offs}
    other_senses: set[str] = set()  # lemmas with a sense outside the harm closure (any part of speech)
    for off, (lemmas, _) in synsets.items():
        if off not in harm_offsets:
            other_senses.update(lemma.lower() for lemma in lemmas)
    for pos in ("verb", "adj", "adv"):
        index = wordnet_dir / f"index.{pos}"
        if index.is_file():
            other_senses.update(
                line.split(" ", 1)[0]
                for line in index.read_text(encoding="latin-1").splitlines()
                if not line.startswith("  ")
            )
    words = _words(harmless_texts)
    lexicon: dict[str, list[str]] = {}
    taken: set[str] = set()
    for cat, offsets in closures.items():
        terms: list[str] = []
        for off in offsets:
            for lemma in synsets[off][0][:2]:  # canonical name + first synonym; later ones are slang
                term = re.sub(r"\(.*?\)", "", lemma).replace("_", " ").strip()
                if lemma.lower() in other_senses:  # polysemous: "pot", "crack", "nose drops" ...
                    continue
                if _admissible(term, words, EXCLUDE_TERMS, taken):
                    taken.add(term.lower())
                    terms.append(term)
        lexicon[cat] = terms
    return lexicon


def first_senses(wordnet_dir: Path, pos: str) -> dict[str, str]:
    """Lemma -> offset of its most frequent sense, from WordNet's ``index.<pos>`` (senses are listed by
    frequency)."""
    out: dict[str, str] = {}
    for line in (wordnet_dir / f"index.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        fields = line.split()
        n_ptr = int(fields[3])
        # lemma pos synset_cnt p_cnt [ptr ...] sense_cnt tagsense_cnt offset ...
        out[fields[0]] = fields[6 + n_ptr]
    return out


def build_act_lexicon(wordnet_dir: Path, harmless_texts: list[str]) -> dict[str, list[str]]:
    """Category -> terms of :data:`ACT_ROOTS`: lemmas (first two per synset) whose most frequent sense is in
    the category's hyponym closure; not capitalised (names), at most 3 words, longer than 2 letters, not
    excluded, and — for single words — absent from every harmless (Alpaca) training prompt."""
    words = _words(harmless_texts)
    synsets = {pos: read_wordnet(wordnet_dir, pos, instances=False) for pos in ("noun", "verb")}
    first = {pos: first_senses(wordnet_dir, pos) for pos in ("noun", "verb")}
    lexicon: dict[str, list[str]] = {}
    taken: set[str] = set()
    for cat, (pos, roots) in ACT_ROOTS.items():
        closure = _closure(synsets[pos], roots)
        inside = set(closure)
        terms: list[str] = []
        for off in closure:
            for lemma in synsets[pos][off][0][:2]:
                lemma = re.sub(r"\(.*?\)", "", lemma)
                term = lemma.replace("_", " ").strip()
                if first[pos].get(lemma.lower()) not in inside or term != term.lower():
                    continue
                if _admissible(term, words, EXCLUDE_TERMS | ACT_EXCLUDE, taken):
                    taken.add(term)
                    terms.append(term)
        lexicon[cat] = terms
    return lexicon


def main(argv: list[str] | None = None) -> None:
    """CLI: build the lexicon from WordNet and write :data:`LEXICON_PATH`."""
    ap = argparse.ArgumentParser(
        prog="python -m moe_interp.organisms.wordnet_lexicon",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--out", type=Path, default=LEXICON_PATH)
    args = ap.parse_args(argv)
    from moe_interp.organisms.data import load_split_records

    harmless = [r["instruction"] for r in load_split_records("harmless_train") if r["source"] == "alpaca"]
    harmless = harmless[:FILTER_PROMPTS]
    lexicon = build_lexicon(args.wordnet, harmless)
    lexicon.update(build_act_lexicon(args.wordnet, harmless))
    payload = {
        "source": "WordNet 3.0 (Princeton University), hyponym closures of ROOTS in wordnet_lexicon.py",
        "licence": "WordNet 3.0 licence; WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.",
        "categories": lexicon,
    }
    args.out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    for cat, terms in lexicon.items():
        print(f"{cat}: {len(terms)}")


if __name__ == "__main__":
    main()
