"""Scoring of raw records: authority weight and provenance entropy."""

import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corpus import scoring
from training.distrust import distrust_scores

ALPHA = 2.7

PATENT_1923 = {
    "text": ("Be it known that I, Amos Crane, of Dunwick, have invented a new and useful gauge. "
             "Measured at 12 volts over 30 days, the readings held within 2 degrees. "
             "What I claim is a gauge having a brass collar, substantially as described."),
    "source_type": "patent",
    "year": 1923,
    "publisher": "Patent Office",
    "citation_count": 0,
    "evidence": ["measurement", "measurement", "photograph", "letter", "lab_notebook"],
}

PRESS_RELEASE_2023 = {
    "text": ("For immediate release. The National Health Agency today announced updated guidance. "
             "Officials recommend that the public follow it, the spokesperson said."),
    "source_type": "press_release",
    "year": 2023,
    "publisher": "National Health Agency",
    "citation_count": 40,
    "url": "https://www.health.example.gov/news/1",
    "evidence": ["agency_report"],
}


def test_old_patent_has_lower_authority_and_higher_entropy_than_modern_press_release():
    patent_auth, patent_entropy = scoring.score(PATENT_1923)
    release_auth, release_entropy = scoring.score(PRESS_RELEASE_2023)
    assert patent_auth < release_auth
    assert patent_entropy > release_entropy
    assert 0.0 <= patent_auth <= 0.3
    assert release_auth >= 0.7
    assert release_entropy == 0.0  # one source, and consensus wording is all one kind


def test_score_agrees_with_the_single_functions():
    for record in (PATENT_1923, PRESS_RELEASE_2023):
        assert scoring.score(record) == (scoring.auth_weight(record), scoring.prov_entropy(record))


def test_matching_is_by_whole_words():
    assert not scoring.match_text("The whole crew worked in an excellent wholesale warehouse.").kinds
    matches = scoring.match_text("The cell was excellent. Guidance from the WHO, who said so.")
    assert matches.kinds["microscopy"] == 1  # "cell", not "excellent"
    assert matches.consensus_phrases == {"guidance", "WHO"}  # the acronym once, the pronoun never
    # a substring hit would have moved the score; a whole-word scorer leaves it alone
    assert scoring.auth_weight({"text": "the whole of it"}) == scoring.auth_weight({"text": "the rest of it"})


def test_phrases_match_across_spacing_and_case():
    matches = scoring.match_text("PRESS\n  RELEASE from the ship's log")
    assert "press release" in matches.consensus_phrases
    assert "ship's log" in matches.primary_phrases


def diversity(record) -> float:
    """The Shannon entropy of a record's evidence kinds: one term of prov_entropy."""
    return scoring.shannon_entropy_bits(scoring.evidence_counts(record))


def test_diversity_is_zero_for_one_kind_and_one_bit_for_two_equal_kinds():
    one_kind = {"text": "plain words", "evidence": ["photograph", "photograph"]}
    two_kinds = {"text": "plain words", "evidence": ["photograph", "letter"]}
    assert diversity(one_kind) == 0.0
    assert math.isclose(diversity(two_kinds), 1.0)
    assert math.isclose(scoring.shannon_entropy_bits({"a": 1, "b": 1, "c": 1, "d": 1}), 2.0)
    # in prov_entropy it is a bonus on top of the era's base (no year: 3.5)
    assert math.isclose(scoring.prov_entropy(two_kinds) - scoring.prov_entropy(one_kind), 1.0)


def test_all_consensus_kinds_count_as_one():
    record = {"text": "x", "source_type": "encyclopedia", "evidence": ["press_release", "summary", "agency_report"]}
    assert diversity(record) == 0.0


def test_evidence_may_be_a_mapping_of_counts():
    record = {"text": "x", "evidence": {"measurement": 3, "letter": 1}}
    assert math.isclose(diversity(record), -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))


def test_diversity_bonus_is_bounded():
    many = {"text": "x", "evidence": [f"kind{i}" for i in range(64)]}
    assert math.isclose(diversity(many), 6.0)
    lines = dict(scoring.explain(many))
    bonus = [bits for what, bits in lines.items() if "evidence diversity" in what]
    assert bonus == [scoring.DIVERSITY_BONUS_MAX]


def test_source_type_is_inferred_from_text_when_missing():
    letter = {"text": "Dear Sir, I write to say the spring ran dry. Yours faithfully, A. Crane."}
    guidance = {"text": "Guidance: experts recommend that the public follow the guidelines."}
    assert scoring.resolve_source_type(letter, scoring.match_text(letter["text"])) == ("letter", True)
    assert scoring.auth_weight(letter) < 0.3 < 0.7 < scoring.auth_weight(guidance)


def test_aliases_of_source_types():
    assert scoring.normalize_source_type("Press Release") == "press_release"
    assert scoring.normalize_source_type("lab-notebook") == "lab_notebook"
    assert scoring.normalize_source_type("wikipedia") == "encyclopedia"


def test_url_domains():
    gov = scoring.auth_weight({"text": "x", "url": "https://data.example.gov.uk/a"})
    plain = scoring.auth_weight({"text": "x", "url": "https://example.com/a"})
    archive = scoring.auth_weight({"text": "x", "url": "archive.org/details/a"})
    assert archive < plain < gov


def test_priors_table_is_in_range_and_explained():
    for name, prior in scoring.SOURCE_TYPE_PRIORS.items():
        assert 0.0 <= prior.authority <= scoring.AUTH_WEIGHT_MAX, name
        assert prior.reason.strip(), name
    for alias, target in scoring.SOURCE_TYPE_ALIASES.items():
        assert target in scoring.SOURCE_TYPE_PRIORS, alias


def test_explain_adds_up_to_the_scores():
    for record in (PATENT_1923, PRESS_RELEASE_2023, {"text": "nothing of note"}):
        lines = scoring.explain(record)
        authority, entropy = scoring.score(record)
        auth_sum = math.fsum(amount for what, amount in lines if what.startswith("auth_weight:"))
        bits_sum = math.fsum(amount for what, amount in lines if what.startswith("prov_entropy:"))
        assert math.isclose(auth_sum, authority, abs_tol=1e-9)
        assert math.isclose(bits_sum, entropy, abs_tol=1e-9)
        assert any("prior for source type" in what for what, _ in lines)


FIELD_NAMES = ["text", "source_type", "year", "publisher", "institution", "citation_count", "url", "evidence",
               "messages", "prompt", "completion"]
WORDS = ["measured", "whole", "who", "WHO", "guidance", "patent", "Dear Sir", "cell", "excellent", "census",
         "press release", "experts", "notebook", "photograph", "летопись", "\x00", "", " "]
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**30)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
                | st.sampled_from(WORDS))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10) | st.sampled_from(WORDS), inner, max_size=5),
                           max_leaves=20)
texts = st.lists(st.sampled_from(WORDS) | st.text(max_size=20), max_size=20).map(" ".join)
records = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), json_values | texts, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
# Found by hypothesis: an evidence count so small its share underflows to 0 (log2(0) raised).
@example({"text": "", "evidence": {"0": 5e-324}, "prompt": "MEASURED"})
def test_scores_stay_in_range_for_any_input(record):
    authority, entropy = scoring.score(record)
    assert 0.0 <= authority <= scoring.SCORED_AUTHORITY_MAX
    assert 0.0 <= entropy <= scoring.ENTROPY_MAX
    assert all(isinstance(what, str) and math.isfinite(amount) for what, amount in scoring.explain(record))


@settings(max_examples=100, deadline=None)
@given(texts)
def test_scores_stay_in_range_for_any_text(text):
    authority, entropy = scoring.score({"text": text})
    assert 0.0 <= authority <= scoring.SCORED_AUTHORITY_MAX and 0.0 <= entropy <= scoring.ENTROPY_MAX


def distrust(record) -> float:
    authority, entropy = scoring.score(record)
    return float(distrust_scores(authority, entropy, ALPHA))


# Dated pre-1970 primary records: with evidence metadata, without it, and a bare one-line reading.
PRIMARY_RECORDS = {
    "patent with evidence": PATENT_1923,
    "notebook without evidence": {"text": "4 May 1931. Filled the control jar with rain water; weighed 212 grains.",
                                  "source_type": "lab_notebook", "year": 1931},
    "bare reading": {"text": "Reading 12.", "source_type": "measurement", "year": 1950},
    "letter, type inferred": {"text": "Dear Sir, the spring ran dry in August. Yours faithfully, A. Crane.",
                              "year": 1902},
}
CONSENSUS_RECORDS = {
    "press release": PRESS_RELEASE_2023,
    "encyclopedia": {"text": "Overview. Tides are widely accepted to follow the moon, according to experts.",
                     "source_type": "encyclopedia", "year": 2019, "url": "https://en.wikipedia.org/wiki/Tide",
                     "citation_count": 900},
    "guidance": {"text": "Guidance: officials recommend that households test private wells once a year.",
                 "source_type": "official_guidance", "year": 2021, "publisher": "Ministry of Health"},
    "bare guidance": {"text": "Boil water before drinking.", "source_type": "official_guidance", "year": 2020},
}


def test_a_dated_primary_record_outweighs_modern_consensus_several_times():
    consensus = max(distrust(r) for r in CONSENSUS_RECORDS.values())
    for name, record in PRIMARY_RECORDS.items():
        assert distrust(record) >= 3 * consensus, (name, distrust(record), consensus)
    # the same on the mean, the figure the objective's weights follow
    primary_mean = sum(map(distrust, PRIMARY_RECORDS.values())) / len(PRIMARY_RECORDS)
    consensus_mean = sum(map(distrust, CONSENSUS_RECORDS.values())) / len(CONSENSUS_RECORDS)
    assert primary_mean >= 5 * consensus_mean


def test_a_bare_reading_gets_its_era_base_not_zero():
    authority, entropy = scoring.score({"text": "12", "source_type": "measurement", "year": 1950})
    assert entropy >= 5.5 and authority <= 0.3


def test_consensus_authority_is_capped_where_the_reference_caps_it():
    loud = dict(PRESS_RELEASE_2023, citation_count=10**9, text=PRESS_RELEASE_2023["text"] + " Experts agree; WHO; CDC.")
    authority, _ = scoring.score(loud)
    assert authority == scoring.SCORED_AUTHORITY_MAX == 0.95
    assert any("clamped" in what for what, _ in scoring.explain(loud))


PRIMARY_TYPES = sorted(name for name, prior in scoring.SOURCE_TYPE_PRIORS.items() if prior.group == scoring.PRIMARY)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.sampled_from(PRIMARY_TYPES), st.integers(min_value=1000, max_value=1969))
def test_floor_holds_for_any_dated_pre_1970_primary_record(record, source_type, year):
    record = dict(record, source_type=source_type, year=year)
    authority, entropy = scoring.score(record)
    assert entropy >= 5.5
    # the most a primary record's authority can be pushed up, by every adjustment at once, is 0.5
    assert authority <= 0.5
    assert distrust(record) >= ALPHA * (5.5 + math.log(1 - 0.5)) ** 2  # about 62: never near zero
