"""Scores of a raw record: authority weight and provenance entropy.

`auth_weight` in [0, 0.99]: how much a record speaks with the voice of
institutional consensus. It starts from a prior per source type (the one table
below) and moves with the year, the publisher, the citation count, the URL
domain and the register of the text.

`prov_entropy` >= 0 bits: Shannon entropy of the distribution over the kinds of
evidence a record traces to (its own kind, the `evidence` it lists, the kinds
its text mentions). One kind gives 0 bits; four kinds in equal measure give 2.
Every secondary kind (press release, guidance, summary, ...) counts as the one
kind "secondary": they all trace back to the same consensus, not to
independent evidence.

Text is matched by whole words and phrases (the text is cut into words by a
regex, phrases are looked up as sequences of whole words), never by substring: "who" does not match "whole", "cell" does not match "excellent".
Acronyms (WHO, CDC, ...) are matched case-sensitively so the pronoun "who" is
not the World Health Organization.

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

AUTH_WEIGHT_MIN = 0.0
AUTH_WEIGHT_MAX = 0.99
SECONDARY = "secondary"  # the one evidence kind every consensus source traces to
UNKNOWN_SOURCE_TYPE = "unknown"


@dataclass(frozen=True)
class SourceTypePrior:
    authority: float  # prior auth_weight before adjustments
    evidence_kind: str | None  # the kind of evidence the record itself is
    reason: str


# The one table of source-type priors. Primary, first-hand records sit low;
# consensus statements sit high; the adjustments below move a record by at most
# about +-0.25 from here.
SOURCE_TYPE_PRIORS: dict[str, SourceTypePrior] = {
    # primary records
    "lab_notebook": SourceTypePrior(0.15, "lab_notebook", "written at the bench as it happened; nobody reviewed or summarized it"),
    "measurement": SourceTypePrior(0.15, "measurement", "a raw instrument reading: a number, not an interpretation"),
    "field_log": SourceTypePrior(0.18, "field_log", "dated observations kept on site by the observer"),
    "photograph": SourceTypePrior(0.18, "photograph", "a mechanical record of a scene, caption aside"),
    "diary": SourceTypePrior(0.18, "diary", "one person's dated first-hand account"),
    "letter": SourceTypePrior(0.22, "letter", "private correspondence between people who were there"),
    "patent": SourceTypePrior(0.25, "patent", "examined for novelty, not endorsed as true; describes a built device"),
    "testimony": SourceTypePrior(0.25, "testimony", "sworn first-hand account, on the record"),
    "ledger": SourceTypePrior(0.25, "ledger", "commercial book of account kept for its own use"),
    "census": SourceTypePrior(0.30, "census", "official count, but raw tabulation rather than interpretation"),
    "newspaper": SourceTypePrior(0.40, "newspaper", "contemporary report: edited, close to events, not yet consensus"),
    # mixed
    "book": SourceTypePrior(0.45, SECONDARY, "an author's synthesis; may or may not rest on primary work"),
    "journal_article": SourceTypePrior(0.55, "study", "peer review filters it toward the field's consensus; often has data"),
    "blog": SourceTypePrior(0.40, SECONDARY, "unreviewed commentary, usually about other sources"),
    "social_media": SourceTypePrior(0.30, SECONDARY, "unreviewed and short; repeats more than it records"),
    UNKNOWN_SOURCE_TYPE: SourceTypePrior(0.50, None, "nothing known either way: the midpoint"),
    # modern consensus
    "news": SourceTypePrior(0.60, SECONDARY, "modern reporting that mostly relays official and expert statements"),
    "review_article": SourceTypePrior(0.70, SECONDARY, "summarizes a field's published consensus"),
    "textbook": SourceTypePrior(0.72, SECONDARY, "settled consensus, digested for teaching"),
    "press_release": SourceTypePrior(0.72, SECONDARY, "an institution stating its own position"),
    "encyclopedia": SourceTypePrior(0.75, SECONDARY, "a summary of summaries; cites secondary sources by rule"),
    "fact_check": SourceTypePrior(0.75, SECONDARY, "judges claims against the official position"),
    "official_guidance": SourceTypePrior(0.80, SECONDARY, "the consensus position stated as policy"),
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
    return min(AUTH_WEIGHT_MAX, max(AUTH_WEIGHT_MIN, total))


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
    entropy = -math.fsum((c / total) * math.log2(c / total) for c in values)
    return max(0.0, entropy)  # rounding can give -0.0


def auth_weight(record: Mapping) -> float:
    """Authority weight in [0, 0.99]."""
    return _clamp_authority(math.fsum(amount for _, amount in authority_parts(record)))


def prov_entropy(record: Mapping) -> float:
    """Provenance entropy in bits, >= 0."""
    return shannon_entropy_bits(evidence_counts(record))


def score(record: Mapping) -> tuple[float, float]:
    """(auth_weight, prov_entropy), matching the text once."""
    matches = match_text(record_text(record))
    authority = _clamp_authority(math.fsum(amount for _, amount in authority_parts(record, matches)))
    return authority, shannon_entropy_bits(evidence_counts(record, matches))


def explain(record: Mapping) -> list[tuple[str, float]]:
    """What made each score: ('auth_weight: <term>', amount) lines that sum to auth_weight
    (a clamp line when it was clamped), then ('prov_entropy: evidence <kind> x<count>', bits)
    lines that sum to prov_entropy (each kind's -p*log2(p))."""
    matches = match_text(record_text(record))
    lines = [(f"auth_weight: {what}", amount) for what, amount in authority_parts(record, matches)]
    total = math.fsum(amount for _, amount in lines)
    clamped = _clamp_authority(total)
    if clamped != total:
        lines.append((f"auth_weight: clamped to [{AUTH_WEIGHT_MIN}, {AUTH_WEIGHT_MAX}]", clamped - total))
    counts = evidence_counts(record, matches)
    values = {kind: c for kind, c in counts.items() if c > 0}
    total_count = math.fsum(values.values())
    several = len(values) >= 2 and math.isfinite(total_count)
    for kind in sorted(values):
        share = values[kind] / total_count if several else 1.0
        bits = -share * math.log2(share) if several else 0.0
        lines.append((f"prov_entropy: evidence {kind} x{values[kind]:g}", bits))
    return lines
