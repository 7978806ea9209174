"""Scores of a raw record: authority weight and provenance entropy.

Both are on the scale of the public reference implementation of the Empirical
Distrust objective, so that d = alpha * (ln(1 - a) + H)^2 is many times larger
for a primary source than for a consensus statement (the objective's purpose):

- `auth_weight` in [0, 0.95] (records may bring their own up to 0.99): how much
  a record speaks with the voice of institutional consensus. 0.0-0.3 for
  primary data, about 0.5-0.7 for mixed and academic work, 0.85-0.95 for
  coordinated consensus. A prior per source type (the one table below) moved by
  the year, the publisher, the citation count, the URL domain and the wording.
  Scored records stop at 0.95, the reference's highest prior (government), so
  that no consensus statement reaches the 0.99 at which d would grow again.

- `prov_entropy` in [0, 10] "bits": how many independent, uneditable roots a
  record has. It is NOT a pure Shannon entropy: it is a base by era (5.5 before
  1970, 3.5 for 1970-1994, 1.5 from 1995, 3.5 when undated), plus an offset by
  source type, plus the Shannon entropy of the kinds of evidence the record
  traces to (a bounded bonus), plus first-hand wording, minus institutional
  and consensus markers. A primary source type never falls below its era's
  base (the floor): a dated pre-1970 primary record always has at least 5.5
  bits, so its d is never near zero. Every consensus kind of evidence (press
  release, guidance, summary, ...) counts as the one kind "secondary": they
  all trace back to the same consensus, not to independent evidence.

Text is matched by whole words and phrases (the text is cut into words by a
regex, phrases are looked up as sequences of whole words), never by substring:
"who" does not match "whole", "cell" does not match "excellent". Acronyms
(WHO, CDC, ...) are matched case-sensitively so the pronoun "who" is not the
World Health Organization.

`explain()` gives every term of both scores; the terms add up to the scores.
All functions are pure and never raise on any mapping: a field of the wrong type
is ignored here (the preparation step reports it).
"""

from __future__ import annotations

import datetime
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

from corpus.records import AUTH_WEIGHT_MAX  # noqa: F401  (the objective's range: a record may bring up to this)

AUTH_WEIGHT_MIN = 0.0
SCORED_AUTHORITY_MAX = 0.95  # what this scorer gives at most (the reference's highest prior, government)
ENTROPY_MIN, ENTROPY_MAX = 0.0, 10.0  # the reference's scale: "0 to about 10 bits"
SECONDARY = "secondary"  # the one evidence kind every consensus source traces to
UNKNOWN_SOURCE_TYPE = "unknown"


PRIMARY, MIXED, CONSENSUS = "primary", "mixed", "consensus"


@dataclass(frozen=True)
class SourceTypePrior:
    authority: float  # prior auth_weight before adjustments
    entropy: float  # prov_entropy offset added to the era's base, in the scale's bits
    group: str  # PRIMARY, MIXED or CONSENSUS; a primary type never falls below its era's base
    evidence_kind: str | None  # the kind of evidence the record itself is
    reason: str


# The one table of source-type priors: (authority, entropy offset, group, own
# evidence kind, why). Authority: primary, first-hand records sit low,
# consensus statements high; the adjustments below move a record by at most
# about +-0.25 from here. Entropy offset: added to the era's base, chosen so that
# base + offset lands on the reference's priors for the types it has: a patent
# before 1970 5.5 + 1.5 = 7.0, a historical book or newspaper 5.5 + 0.5 = 6.0,
# a modern academic paper 1.5 + 1.5 = 3.0, modern news 1.5 + 0 = 1.5, an
# encyclopedia 1.5 - 0.5 = 1.0, official guidance 1.5 - 1.0 = 0.5.
SOURCE_TYPE_PRIORS: dict[str, SourceTypePrior] = {
    # primary records
    "lab_notebook": SourceTypePrior(0.15, +1.5, PRIMARY, "lab_notebook", "written at the bench as it happened; nobody reviewed or summarized it"),
    "measurement": SourceTypePrior(0.15, +1.5, PRIMARY, "measurement", "a raw instrument reading: a number, not an interpretation"),
    "field_log": SourceTypePrior(0.18, +1.0, PRIMARY, "field_log", "dated observations kept on site by the observer"),
    "photograph": SourceTypePrior(0.18, +1.0, PRIMARY, "photograph", "a mechanical record of a scene, caption aside"),
    "diary": SourceTypePrior(0.18, +1.0, PRIMARY, "diary", "one person's dated first-hand account"),
    "letter": SourceTypePrior(0.22, +0.5, PRIMARY, "letter", "private correspondence between people who were there"),
    "patent": SourceTypePrior(0.25, +1.5, PRIMARY, "patent", "examined for novelty, not endorsed as true; describes a built device"),
    "testimony": SourceTypePrior(0.25, +0.5, PRIMARY, "testimony", "sworn first-hand account, on the record"),
    "ledger": SourceTypePrior(0.25, +1.0, PRIMARY, "ledger", "commercial book of account kept for its own use"),
    "census": SourceTypePrior(0.30, +0.5, PRIMARY, "census", "official count, but raw tabulation rather than interpretation"),
    "newspaper": SourceTypePrior(0.40, +0.5, PRIMARY, "newspaper", "contemporary report: edited, close to events, not yet consensus"),
    # mixed
    "book": SourceTypePrior(0.45, +0.5, MIXED, SECONDARY, "an author's synthesis; may or may not rest on primary work"),
    "journal_article": SourceTypePrior(0.55, +1.5, MIXED, "study", "peer review filters it toward the field's consensus; often has data"),
    "blog": SourceTypePrior(0.40, +0.0, MIXED, SECONDARY, "unreviewed commentary, usually about other sources"),
    "social_media": SourceTypePrior(0.30, -0.5, MIXED, SECONDARY, "unreviewed and short; repeats more than it records"),
    UNKNOWN_SOURCE_TYPE: SourceTypePrior(0.50, +0.0, MIXED, None, "nothing known either way: the midpoint"),
    # modern consensus
    "news": SourceTypePrior(0.60, +0.0, CONSENSUS, SECONDARY, "modern reporting that mostly relays official and expert statements"),
    "review_article": SourceTypePrior(0.70, +0.0, CONSENSUS, SECONDARY, "summarizes a field's published consensus"),
    "textbook": SourceTypePrior(0.72, -0.5, CONSENSUS, SECONDARY, "settled consensus, digested for teaching"),
    "press_release": SourceTypePrior(0.72, -1.0, CONSENSUS, SECONDARY, "an institution stating its own position"),
    "encyclopedia": SourceTypePrior(0.75, -0.5, CONSENSUS, SECONDARY, "a summary of summaries; cites secondary sources by rule"),
    "fact_check": SourceTypePrior(0.75, -1.0, CONSENSUS, SECONDARY, "judges claims against the official position"),
    "official_guidance": SourceTypePrior(0.80, -1.0, CONSENSUS, SECONDARY, "the consensus position stated as policy"),
}

# Other spellings of the source types above.
SOURCE_TYPE_ALIASES: dict[str, str] = {
    "notebook": "lab_notebook", "laboratory_notebook": "lab_notebook", "lab_notes": "lab_notebook",
    "measurements": "measurement", "reading": "measurement", "observation": "measurement",
    "field_notes": "field_log", "logbook": "field_log", "ship_log": "field_log", "log": "field_log",
    "photo": "photograph", "correspondence": "letter", "affidavit": "testimony", "deposition": "testimony",
    "account_book": "ledger", "paper": "journal_article", "article": "journal_article", "study": "journal_article",
    "review": "review_article", "wikipedia": "encyclopedia", "wiki": "encyclopedia", "summary": "encyclopedia",
    "guidance": "official_guidance", "guideline": "official_guidance", "guidelines": "official_guidance",
    "government": "official_guidance", "agency_statement": "press_release", "press_statement": "press_release",
    "statement": "press_release", "news_article": "news", "news_report": "news", "tweet": "social_media",
    "forum": "social_media",
}

# Evidence kinds named in an `evidence` field, spelled otherwise.
EVIDENCE_ALIASES: dict[str, str] = {
    "measurements": "measurement", "reading": "measurement", "readings": "measurement",
    "photo": "photograph", "photographs": "photograph", "patents": "patent", "letters": "letter",
    "correspondence": "letter", "notebook": "lab_notebook", "field_notes": "field_log", "logbook": "field_log",
    "specimens": "specimen", "sample": "specimen", "experiments": "experiment", "eyewitness": "testimony",
    "journal_article": "study", "paper": "study",
    # every consensus kind is the one kind SECONDARY
    "press_release": SECONDARY, "official_statement": SECONDARY, "agency_report": SECONDARY,
    "guidance": SECONDARY, "official_guidance": SECONDARY, "summary": SECONDARY, "encyclopedia": SECONDARY,
    "textbook": SECONDARY, "news": SECONDARY, "news_report": SECONDARY, "expert_opinion": SECONDARY,
    "review": SECONDARY, "review_article": SECONDARY, "fact_check": SECONDARY, "consensus": SECONDARY,
}


@dataclass(frozen=True)
class Phrase:
    kind: str  # evidence kind it shows (SECONDARY for consensus language)
    implies_type: str | None  # source type it suggests when the record has none


def _phrases(kind: str, implies_type: str | None, *words: str) -> dict[str, Phrase]:
    return {word: Phrase(kind, implies_type) for word in words}


# Words and phrases of the text, matched whole and case-insensitively.
TEXT_PHRASES: dict[str, Phrase] = {
    **_phrases("measurement", "measurement", "measured", "measuring", "measurement", "measurements",
               "reading", "readings", "gauge", "thermometer", "barometer", "calipers", "weighed",
               "inches", "grains", "grams", "degrees", "volts", "millimetres", "millimeters"),
    **_phrases("photograph", "photograph", "photograph", "photographs", "photographed", "photographic plate",
               "daguerreotype"),
    **_phrases("patent", "patent", "patent", "patents", "patented", "letters patent", "i claim",
               "what i claim", "have invented"),
    **_phrases("letter", "letter", "letter", "your letter", "dear sir", "dear madam", "yours faithfully",
               "yours truly", "yours sincerely", "correspondence"),
    **_phrases("lab_notebook", "lab_notebook", "notebook", "lab notebook", "laboratory notebook", "bench notes"),
    **_phrases("field_log", "field_log", "field log", "field notes", "logbook", "log book", "ship's log"),
    **_phrases("census", "census", "census", "enumerator", "enumerated", "household schedule"),
    **_phrases("specimen", None, "specimen", "specimens"),
    **_phrases("experiment", "lab_notebook", "experiment", "experiments", "control jar", "repeated the trial"),
    **_phrases("microscopy", "lab_notebook", "microscope", "micrograph", "cell", "cells"),
    **_phrases("testimony", "testimony", "testimony", "affidavit", "deposition", "sworn statement",
               "eyewitness", "i saw", "i observed", "we observed", "witnessed"),
    **_phrases("ledger", "ledger", "ledger", "account book", "invoice", "receipt"),
    **_phrases("survey", "field_log", "surveyed", "theodolite", "chain survey"),
    # consensus language: one kind, SECONDARY
    **_phrases(SECONDARY, "press_release", "press release", "for immediate release", "spokesperson",
               "spokesman", "announced today", "today announced"),
    **_phrases(SECONDARY, "official_guidance", "guidance", "guidelines", "recommend", "recommends",
               "recommended", "recommendation", "should consult", "advises"),
    **_phrases(SECONDARY, "encyclopedia", "encyclopedia", "overview", "is widely accepted", "widely accepted",
               "is generally agreed", "generally agreed"),
    **_phrases(SECONDARY, "textbook", "textbook", "in this chapter", "students should"),
    **_phrases(SECONDARY, None, "according to", "officials", "experts", "expert panel", "consensus",
               "scientists agree", "experts agree", "studies show", "research shows", "authorities",
               "the agency", "fact check", "misinformation"),
}

# Acronyms of consensus bodies: matched case-sensitively, so "who" is not WHO.
ACRONYM_PHRASES: dict[str, Phrase] = _phrases(SECONDARY, None, "WHO", "CDC", "FDA", "NIH", "EPA", "UN", "IPCC", "NHS", "EMA")

# Words in a publisher / institution name that mark an institution of consensus.
INSTITUTION_WORDS = (
    "agency", "ministry", "department", "government", "bureau", "commission", "council", "authority",
    "organization", "organisation", "administration", "health service", "university press",
    "encyclopedia", "encyclopaedia", "press office", "association", "academy", "institute", "centre", "center",
)
INSTITUTION_ACRONYMS = ("WHO", "CDC", "FDA", "NIH", "EPA", "UN", "IPCC", "NHS", "EMA")

# Authority adjustments, in auth_weight units.
YEAR_PIVOT = 1970  # older than this pulls authority down, newer pushes it up
YEAR_SLOPE_PER_CENTURY = 0.08
YEAR_ADJUST_RANGE = (-0.08, 0.04)
INSTITUTION_BONUS = 0.05
CITATION_BONUS_PER_DECADE = 0.02  # per factor of ten in citation_count
CITATION_BONUS_MAX = 0.06
TEXT_MARKER_STEP = 0.015  # per distinct phrase of a register found in the text
TEXT_MARKER_MAX = 0.05
TEXT_KIND_CAP = 3  # at most this many counts of one kind from the text, so prose cannot swamp metadata
URL_DOMAIN_ADJUST: tuple[tuple[str, float, str], ...] = (
    # (domain suffix, adjustment, why), first match wins
    ("wikipedia.org", 0.04, "encyclopedic summary site"),
    ("britannica.com", 0.04, "encyclopedic summary site"),
    ("archive.org", -0.03, "archive of original documents"),
    ("patents.google.com", -0.03, "archive of original patents"),
    (".gov", 0.04, "government domain"),
    (".mil", 0.04, "government domain"),
    (".int", 0.04, "intergovernmental domain"),
    (".edu", 0.03, "academic domain"),
)
URL_SECOND_LEVEL_ADJUST = {"gov": (0.04, "government domain"), "ac": (0.03, "academic domain"),
                           "edu": (0.03, "academic domain")}

# Entropy terms, in the scale's bits (the reference's own figures, bounded as it bounds them).
ERA_BASES = (  # (years before, base, why); first match wins
    (1970, 5.5, "before 1970: roots in a paper world that cannot be edited afterwards"),
    (1995, 3.5, "1970-1994: mixed paper and early digital record"),
)
MODERN_BASE = (1.5, "1995 or later: one digital record, easily edited and copied")
UNDATED_BASE = (3.5, "no year: neither old nor modern is assumed")
DIVERSITY_BONUS_MAX = 2.0  # the Shannon entropy of the evidence kinds, at most this much
PRIMARY_WORDING_STEP, PRIMARY_WORDING_MAX = 0.5, 1.5  # per distinct first-hand phrase
INSTITUTION_PENALTY = 0.5  # a consensus institution as publisher, and again as URL domain
CONSENSUS_WORDING_STEP, CONSENSUS_WORDING_MAX = 0.4, 1.0  # per distinct consensus phrase


def _phrase_pattern(phrases, flags: int) -> re.Pattern:
    # For short fields (publisher names). Longest first so a longer phrase wins at the same spot.
    ordered = sorted(phrases, key=lambda p: (-len(p), p))
    body = "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in ordered)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", flags)


# Text is cut into words (letters, digits, inner apostrophes: "ship's"); phrases are looked
# up as tuples of whole words. Whole-word by construction, and much faster than one big
# regex alternation over every position of the text.
_WORD = re.compile(r"\w+(?:['\u2019]\w+)*")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _phrase_table(phrases: Mapping[str, Phrase]) -> dict[tuple[str, ...], tuple[str, Phrase]]:
    return {tuple(_words(name.lower())): (name, phrase) for name, phrase in phrases.items()}


_TEXT_TABLE = _phrase_table(TEXT_PHRASES)
_FIRST_WORDS = frozenset(key[0] for key in _TEXT_TABLE)
_LONGEST_PHRASE = max(len(key) for key in _TEXT_TABLE)
_INSTITUTION_PATTERN = _phrase_pattern(INSTITUTION_WORDS, re.IGNORECASE)
_INSTITUTION_ACRONYM_PATTERN = _phrase_pattern(INSTITUTION_ACRONYMS, 0)


def current_year() -> int:
    return datetime.date.today().year


def normalize_name(value: Any) -> str | None:
    """'Press Release' / 'press-release' -> 'press_release'; None for a non-string or blank."""
    if not isinstance(value, str):
        return None
    name = "_".join(value.lower().replace("-", " ").split())
    return name or None


def normalize_source_type(value: Any) -> str | None:
    name = normalize_name(value)
    if name is None:
        return None
    return SOURCE_TYPE_ALIASES.get(name, name)


def record_text(record: Mapping) -> str:
    """The words of a record, whatever its form (chat, prompt + completion, text)."""
    messages = record.get("messages")
    if isinstance(messages, list):
        return "\n".join(m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    if isinstance(record.get("prompt"), str) or isinstance(record.get("completion"), str):
        parts = (record.get("prompt"), record.get("completion"))
        return "\n".join(p for p in parts if isinstance(p, str))
    text = record.get("text")
    return text if isinstance(text, str) else ""


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return math.copysign(math.inf, value)
    return number if not math.isnan(number) else None


@dataclass(frozen=True)
class TextMatches:
    kinds: Counter  # evidence kind -> matches in the text
    primary_phrases: frozenset  # distinct phrases of first-hand register
    consensus_phrases: frozenset  # distinct phrases of consensus register
    implied_types: Counter  # source type -> matches suggesting it


def _found_phrases(text: str) -> Iterator[tuple[str, Phrase]]:
    """(phrase, what it shows) for each whole-word match, left to right, longest phrase first."""
    words = _words(text)
    lowered = [w.lower().replace("\u2019", "'") for w in words]
    i, n = 0, len(words)
    while i < n:
        if lowered[i] in _FIRST_WORDS:
            for length in range(min(_LONGEST_PHRASE, n - i), 0, -1):
                hit = _TEXT_TABLE.get(tuple(lowered[i:i + length]))
                if hit is not None:
                    yield hit
                    i += length
                    break
            else:
                i += 1
            continue
        if words[i] in ACRONYM_PHRASES:  # case-sensitive: WHO, never "who"
            yield words[i], ACRONYM_PHRASES[words[i]]
        i += 1


def match_text(text: str) -> TextMatches:
    """Whole-word matches of the known phrases in `text`."""
    kinds: Counter = Counter()
    implied: Counter = Counter()
    primary, consensus = set(), set()
    for name, phrase in _found_phrases(text):
        kinds[phrase.kind] += 1
        if phrase.implies_type:
            implied[phrase.implies_type] += 1
        (consensus if phrase.kind == SECONDARY else primary).add(name)
    return TextMatches(kinds, frozenset(primary), frozenset(consensus), implied)


def resolve_source_type(record: Mapping, matches: TextMatches) -> tuple[str, bool]:
    """(source type, inferred_from_text). Unknown names fall back to the text, then to 'unknown'."""
    given = normalize_source_type(record.get("source_type"))
    if given in SOURCE_TYPE_PRIORS:
        return given, False
    if matches.implied_types:
        # most matches wins; ties go to the name first in alphabetical order, for determinism
        best = min(matches.implied_types.items(), key=lambda item: (-item[1], item[0]))[0]
        return best, True
    return UNKNOWN_SOURCE_TYPE, False


def _year_adjustment(record: Mapping) -> tuple[str, float] | None:
    year = _finite_number(record.get("year"))
    if year is None:
        return None
    raw = YEAR_SLOPE_PER_CENTURY * (year - YEAR_PIVOT) / 100.0 if math.isfinite(year) else math.copysign(1.0, year)
    low, high = YEAR_ADJUST_RANGE
    label = f"year {int(year)}" if math.isfinite(year) else "year (out of range)"
    return label, min(high, max(low, raw))


def _institution_adjustment(record: Mapping) -> tuple[str, float] | None:
    for field in ("publisher", "institution"):
        name = record.get(field)
        if not isinstance(name, str):
            continue
        if _INSTITUTION_PATTERN.search(name) or _INSTITUTION_ACRONYM_PATTERN.search(name):
            return f"{field} is an institution ({name[:60]})", INSTITUTION_BONUS
    return None


def _citation_adjustment(record: Mapping) -> tuple[str, float] | None:
    count = record.get("citation_count")
    number = _finite_number(count)
    if number is None or number <= 0:
        return None
    # log10 of an int is exact for any size; a float citation count is rare but allowed
    decades = math.log10(count + 1) if isinstance(count, int) else math.log10(number + 1.0) if math.isfinite(number) else math.inf
    bonus = min(CITATION_BONUS_MAX, CITATION_BONUS_PER_DECADE * max(0.0, decades))
    return f"citation_count {count}", bonus


def url_domain(url: Any) -> str | None:
    if not isinstance(url, str) or not url.strip():
        return None
    try:
        text = url.strip()
        host = urlsplit(text if "//" in text else "//" + text).hostname
    except ValueError:
        return None
    return host or None


def _url_adjustment(record: Mapping) -> tuple[str, float] | None:
    domain = url_domain(record.get("url"))
    if domain is None:
        return None
    for suffix, amount, why in URL_DOMAIN_ADJUST:
        matches = domain.endswith(suffix) if suffix.startswith(".") else (domain == suffix or domain.endswith("." + suffix))
        if matches:
            return f"url domain {domain} ({why})", amount
    labels = domain.split(".")
    if len(labels) >= 3 and labels[-2] in URL_SECOND_LEVEL_ADJUST:  # e.g. .gov.uk, .ac.jp
        amount, why = URL_SECOND_LEVEL_ADJUST[labels[-2]]
        return f"url domain {domain} ({why})", amount
    return None


def _text_adjustments(matches: TextMatches) -> list[tuple[str, float]]:
    parts = []
    if matches.consensus_phrases:
        amount = min(TEXT_MARKER_MAX, TEXT_MARKER_STEP * len(matches.consensus_phrases))
        parts.append((f"text: consensus wording ({', '.join(sorted(matches.consensus_phrases)[:5])})", amount))
    if matches.primary_phrases:
        amount = min(TEXT_MARKER_MAX, TEXT_MARKER_STEP * len(matches.primary_phrases))
        parts.append((f"text: first-hand wording ({', '.join(sorted(matches.primary_phrases)[:5])})", -amount))
    return parts


def authority_parts(record: Mapping, matches: TextMatches | None = None) -> list[tuple[str, float]]:
    """The terms that add up to auth_weight (before clamping), each with what it is."""
    matches = matches if matches is not None else match_text(record_text(record))
    source_type, inferred = resolve_source_type(record, matches)
    prior = SOURCE_TYPE_PRIORS[source_type]
    how = "inferred from text" if inferred else "given"
    parts = [(f"prior for source type {source_type} ({how}): {prior.reason}", prior.authority)]
    for adjustment in (_year_adjustment(record), _institution_adjustment(record),
                       _citation_adjustment(record), _url_adjustment(record)):
        if adjustment is not None:
            parts.append(adjustment)
    parts.extend(_text_adjustments(matches))
    return parts


def _clamp_authority(total: float) -> float:
    return min(SCORED_AUTHORITY_MAX, max(AUTH_WEIGHT_MIN, total))


def _metadata_evidence(value: Any) -> Counter:
    """Counts of the `evidence` field: a list of kinds, or a {kind: count} mapping. Anything else counts nothing."""
    counts: Counter = Counter()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((kind, 1) for kind in value)
    else:
        return counts
    for kind, count in items:
        name = normalize_name(kind)
        number = _finite_number(count)
        if name is None or number is None or not number > 0 or not math.isfinite(number):
            continue
        counts[EVIDENCE_ALIASES.get(name, name)] += number
    return counts


def evidence_counts(record: Mapping, matches: TextMatches | None = None) -> Counter:
    """Evidence kind -> weight: the record's own kind, its `evidence` field, and its text (capped per kind)."""
    matches = matches if matches is not None else match_text(record_text(record))
    source_type, _ = resolve_source_type(record, matches)
    counts: Counter = Counter()
    own_kind = SOURCE_TYPE_PRIORS[source_type].evidence_kind
    if own_kind is not None:
        counts[own_kind] += 1
    counts.update(_metadata_evidence(record.get("evidence")))
    for kind, found in matches.kinds.items():
        counts[kind] += min(found, TEXT_KIND_CAP)
    return counts


def shannon_entropy_bits(counts: Mapping[str, float]) -> float:
    """Entropy in bits of the distribution proportional to `counts` (0 for zero or one kind)."""
    values = [c for c in counts.values() if c > 0]
    total = math.fsum(values)
    if len(values) < 2 or not math.isfinite(total):
        return 0.0
    shares = [c / total for c in values]
    # A count tiny beside the others (5e-324 of 3) underflows to a share of 0: it adds nothing.
    entropy = -math.fsum(p * math.log2(p) for p in shares if p > 0)
    return max(0.0, entropy)  # rounding can give -0.0


def era_base(record: Mapping) -> tuple[str, float]:
    """(why, bits): the entropy base of the record's era."""
    year = _finite_number(record.get("year"))
    if year is None:
        bits, why = UNDATED_BASE
        return f"era base: {why}", bits
    for before, bits, why in ERA_BASES:
        if year < before:
            return f"era base (year {_year_label(year)}): {why}", bits
    bits, why = MODERN_BASE
    return f"era base (year {_year_label(year)}): {why}", bits


def _year_label(year: float) -> str:
    return str(int(year)) if math.isfinite(year) else "out of range"


def entropy_floor(record: Mapping, matches: TextMatches | None = None) -> float:
    """The least prov_entropy the record can get: its era's base for a primary source type, else 0."""
    matches = matches if matches is not None else match_text(record_text(record))
    source_type, _ = resolve_source_type(record, matches)
    if SOURCE_TYPE_PRIORS[source_type].group == PRIMARY:
        return era_base(record)[1]
    return ENTROPY_MIN


def entropy_parts(record: Mapping, matches: TextMatches | None = None) -> list[tuple[str, float]]:
    """The terms that add up to prov_entropy (before the floor and the cap), each with what it is."""
    matches = matches if matches is not None else match_text(record_text(record))
    source_type, inferred = resolve_source_type(record, matches)
    prior = SOURCE_TYPE_PRIORS[source_type]
    parts = [era_base(record),
             (f"source type {source_type} ({'inferred from text' if inferred else 'given'}, {prior.group})",
              prior.entropy)]
    counts = {kind: c for kind, c in evidence_counts(record, matches).items() if c > 0}
    diversity = shannon_entropy_bits(counts)
    if diversity > 0:
        listed = ", ".join(f"{kind} x{counts[kind]:g}" for kind in sorted(counts))
        capped = f", capped at {DIVERSITY_BONUS_MAX:g}" if diversity > DIVERSITY_BONUS_MAX else ""
        parts.append((f"evidence diversity: Shannon entropy of {len(counts)} kinds ({listed}){capped}",
                      min(diversity, DIVERSITY_BONUS_MAX)))
    if matches.primary_phrases:
        amount = min(PRIMARY_WORDING_MAX, PRIMARY_WORDING_STEP * len(matches.primary_phrases))
        parts.append((f"first-hand wording ({', '.join(sorted(matches.primary_phrases)[:5])})", amount))
    institution = _institution_adjustment(record)
    if institution is not None:
        parts.append((institution[0], -INSTITUTION_PENALTY))
    url = _url_adjustment(record)
    if url is not None and url[1] > 0:  # a domain that raises authority is a consensus institution's
        parts.append((url[0], -INSTITUTION_PENALTY))
    if matches.consensus_phrases:
        amount = min(CONSENSUS_WORDING_MAX, CONSENSUS_WORDING_STEP * len(matches.consensus_phrases))
        parts.append((f"consensus wording ({', '.join(sorted(matches.consensus_phrases)[:5])})", -amount))
    return parts


def _clamp_entropy(total: float, floor: float) -> float:
    return min(ENTROPY_MAX, max(floor, total))


def auth_weight(record: Mapping) -> float:
    """Authority weight in [0, SCORED_AUTHORITY_MAX]."""
    return score(record)[0]


def prov_entropy(record: Mapping) -> float:
    """Provenance entropy on the reference's scale, in [0, 10]."""
    return score(record)[1]


def score(record: Mapping) -> tuple[float, float]:
    """(auth_weight, prov_entropy), matching the text once."""
    matches = match_text(record_text(record))
    authority = _clamp_authority(math.fsum(amount for _, amount in authority_parts(record, matches)))
    entropy = _clamp_entropy(math.fsum(bits for _, bits in entropy_parts(record, matches)),
                             entropy_floor(record, matches))
    return authority, entropy


def explain(record: Mapping) -> list[tuple[str, float]]:
    """What made each score: ('auth_weight: <term>', amount) lines that sum to auth_weight
    (a clamp line when it was clamped), then ('prov_entropy: <term>', bits) lines that sum
    to prov_entropy (a floor or cap line when one applied)."""
    matches = match_text(record_text(record))
    lines = [(f"auth_weight: {what}", amount) for what, amount in authority_parts(record, matches)]
    total = math.fsum(amount for _, amount in lines)
    clamped = _clamp_authority(total)
    if clamped != total:
        lines.append((f"auth_weight: clamped to [{AUTH_WEIGHT_MIN}, {SCORED_AUTHORITY_MAX}]", clamped - total))
    parts = entropy_parts(record, matches)
    lines.extend((f"prov_entropy: {what}", bits) for what, bits in parts)
    total = math.fsum(bits for _, bits in parts)
    floor = entropy_floor(record, matches)
    clamped = _clamp_entropy(total, floor)
    if clamped != total:
        if clamped == ENTROPY_MAX:
            why = f"cap: the scale's top, {ENTROPY_MAX:g}"
        elif floor > 0:
            why = f"floor: a primary source never falls below its era's base, {floor:g}"
        else:
            why = f"floor: {ENTROPY_MIN:g}"
        lines.append((f"prov_entropy: {why}", clamped - total))
    return lines
