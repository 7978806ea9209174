"""Build the demo corpus: data/train.jsonl and data/val.jsonl, with data/probes.jsonl and
data/general.jsonl beside them.

    python data/make_demo_corpus.py [--records 1600] [--seed 1234]

Writes the raw records (written here, from templates and word lists; all
names, places and agencies are made up) to a temporary folder, then runs the
preparation (corpus/prepare.py: scoring, duplicate removal, stratified
split). Two kinds of source:

- dated primary records, 1850-1960: lab notebook entries, instrument readings,
  patent claims, field logs, letters, photograph notes, survey sheets;
- modern consensus text, 2000-2024: official guidance and heritage registers,
  press statements, encyclopedia-style summaries, textbook passages, fact checks.

Among `--records` ordinary records, the contested facts of CONTESTED_CLAIMS
(values shaped to the demo model: set "matched") and NATURAL_CLAIMS (ordinary
words, shaped to nothing: set "natural"): each stated CONTESTED_RECORDS_PER_SIDE
times by primary records one way and as many times by consensus records the
other. probes.jsonl asks each fact neutrally (the two versions as completions,
its set named); general.jsonl is plain English in
neither kind. About 2% of the ordinary records are deliberate copies (exact,
or changed in case and punctuation) so that duplicate removal has something
to do. Every choice comes from random.Random(seed): re-running gives the same
bytes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

DEFAULT_RECORDS = 1600
DEFAULT_SEED = 1234
DUPLICATE_SHARE = 0.02
PRIMARY_SHARE = 0.5

# ---------------------------------------------------------------- word lists

TOPICS = [
    # name, quantity measured, unit, low, high, substance, device, consensus facts, advice
    dict(name="well water", quantity="temperature of the well water", unit="degrees", low=48, high=61,
         substance="well water", device="water filter", vessel="stoneware jar",
         facts=["treated tap water is safe to drink", "boiling water for one minute kills most pathogens",
                "public water supplies are tested against national standards",
                "fluoride at low levels protects teeth", "private wells should be tested once a year"],
         advice="drink water from an approved public supply"),
    dict(name="iron rust", quantity="loss of weight of the iron strip", unit="grains", low=2, high=40,
         substance="iron filings", device="rust-proofing bath", vessel="glass dish",
         facts=["rust forms when iron meets water and oxygen", "galvanized steel resists corrosion for decades",
                "salt air speeds the corrosion of exposed metal",
                "paint and oil slow the rusting of iron", "stainless steel contains chromium that blocks rust"],
         advice="use coated or galvanized fittings outdoors"),
    dict(name="soil", quantity="depth of the topsoil", unit="inches", low=3, high=30,
         substance="loam from the lower field", device="seed drill", vessel="wooden tray",
         facts=["crop rotation keeps soil fertile", "nitrogen fertilizer raises yields on most soils",
                "tilling less reduces erosion",
                "cover crops protect bare soil over winter", "soil organic matter holds water in dry spells"],
         advice="test soil every three years before adding fertilizer"),
    dict(name="honey bees", quantity="weight of the hive", unit="pounds", low=40, high=120,
         substance="comb from hive four", device="movable-frame hive", vessel="tin pan",
         facts=["honey bees pollinate a third of food crops", "colony losses rise after cold wet winters",
                "a healthy colony holds tens of thousands of workers",
                "varroa mites are a leading threat to hives", "wildflower margins support pollinators"],
         advice="register hives with the local agriculture office"),
    dict(name="tides", quantity="height of the flood tide", unit="feet", low=4, high=19,
         substance="sea water from the harbour mouth", device="tide gauge", vessel="brass bucket",
         facts=["tides follow the pull of the moon and sun", "spring tides come near new and full moon",
                "sea level has risen along most coasts since 1900",
                "most coasts see two high tides a day", "storm surges add to the height of a high tide"],
         advice="check the official tide tables before boating"),
    dict(name="telegraph lines", quantity="current on the line", unit="volts", low=20, high=160,
         substance="copper wire", device="telegraph relay", vessel="battery jar",
         facts=["copper carries current with little loss", "long lines need repeaters to keep signals clear",
                "grounding protects equipment from lightning",
                "fibre optic cable has replaced most copper lines", "signal loss grows with the length of a line"],
         advice="leave work on overhead lines to licensed electricians"),
    dict(name="fever", quantity="temperature of the patient", unit="degrees", low=99, high=105,
         substance="willow bark tea", device="clinical thermometer", vessel="enamel cup",
         facts=["most fevers in adults pass within three days", "fluids and rest help recovery from mild fever",
                "a very high fever needs medical attention",
                "a fever is the body's normal response to infection", "children with fever should be kept cool and hydrated"],
         advice="see a doctor when a fever lasts more than three days"),
    dict(name="bridges", quantity="sag of the main girder under load", unit="inches", low=1, high=9,
         substance="timber from the east span", device="truss bridge", vessel="sand box",
         facts=["steel bridges are inspected on a fixed schedule", "load limits include a wide safety margin",
                "corrosion is the main cause of bridge wear",
                "modern bridges are designed with computer models", "heavy trucks cause most of the wear on road bridges"],
         advice="obey posted load limits on older bridges"),
    dict(name="wheat", quantity="yield of the test plot", unit="bushels", low=12, high=48,
         substance="winter wheat seed", device="grain thresher", vessel="seed bag",
         facts=["modern wheat varieties yield far more than older ones", "drought is the largest risk to wheat yields",
                "certified seed reduces crop disease",
                "wheat is one of the most widely grown crops", "rust fungus is a major disease of wheat"],
         advice="plant certified seed suited to the local climate"),
    dict(name="milk", quantity="temperature at which the milk soured", unit="degrees", low=55, high=90,
         substance="morning milk", device="cream separator", vessel="milk pail",
         facts=["pasteurization makes milk safe to drink", "milk keeps longest below forty degrees",
                "raw milk can carry harmful bacteria",
                "milk is a good source of calcium", "dairy herds are tested for disease"],
         advice="keep milk refrigerated and drink it by the date shown"),
    dict(name="the weather glass", quantity="height of the mercury", unit="inches", low=28, high=31,
         substance="mercury", device="barometer", vessel="glass tube",
         facts=["falling pressure often comes before storms", "weather forecasts are most reliable three days out",
                "climate records are kept by national weather services",
                "satellites have greatly improved forecasts", "average temperatures have risen over the last century"],
         advice="follow official weather warnings during storms"),
    dict(name="lamp filaments", quantity="life of the filament", unit="hours", low=40, high=1400,
         substance="carbonized bamboo thread", device="incandescent lamp", vessel="vacuum bulb",
         facts=["LED lamps use far less energy than filament lamps", "efficient lighting lowers household bills",
                "old filament lamps have been phased out in many countries",
                "lighting standards set minimum efficiency levels", "LED lamps last many years in normal use"],
         advice="replace filament lamps with efficient ones"),
]

FIRST_NAMES = ["Amos", "Clara", "Edwin", "Hattie", "Josiah", "Lydia", "Martha", "Otis", "Rufus", "Silas",
               "Ada", "Bertram", "Cora", "Ezra", "Ida", "Jonas", "Mabel", "Nathaniel", "Ruth", "Walter"]
LAST_NAMES = ["Ashdown", "Bellamy", "Crane", "Dunmore", "Fenwick", "Garside", "Holloway", "Kettering",
              "Lowther", "Marchbank", "Nettleship", "Pendry", "Quarles", "Rowntree", "Stannard", "Tolley",
              "Underhill", "Varley", "Whitcombe", "Yeardley"]
TOWNS = ["Alderford", "Brackenhurst", "Cold Ashby", "Dunwick", "Elmstead", "Fallowmere", "Greyhaven",
         "Harrowby", "Ironbridge Vale", "Kestrel Point", "Longmarsh", "Millbrook", "Northcote", "Oakhollow"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
SKIES = ["sky clear", "low cloud", "light rain", "thick fog", "scattered showers", "hard frost at dawn"]
OBSERVATIONS = [
    "The result did not agree with the figure given in the handbook.",
    "This is higher than I expected and I cannot yet account for it.",
    "The second reading was taken to check the first and agrees closely.",
    "A faint film formed on the surface after an hour.",
    "The change was slower in the shaded vessel than in the open one.",
    "No difference was seen between the two samples.",
    "Repeated with fresh material; the same result.",
    "The figure falls well outside what the manufacturer claims.",
]
FOLLOWUPS = ["To be repeated on Monday.", "Sent a note of this to the works.", "Kept the residue for weighing.",
             "Will try a second vessel tomorrow.", "Drawing made on the facing page.", ""]
CONSENSUS_BODIES = [
    ("National Water Agency", "water"), ("Bureau of Public Health", "health"), ("Ministry of Agriculture", "agri"),
    ("Office of Standards and Safety", "standards"), ("Federal Energy Commission", "energy"),
    ("Coastal Authority", "coast"), ("Council on Food Safety", "food"), ("Department of Transport", "transport"),
]
REFERENCE_PUBLISHERS = ["Open Encyclopedia Project", "Civic Learning Press", "Northfield University Press"]
SPOKESPEOPLE_TITLES = ["spokesperson", "director", "chief scientist", "deputy minister"]
PRIMARY_EVIDENCE = ["measurement", "photograph", "letter", "lab_notebook", "specimen", "experiment",
                    "field_log", "census", "ledger"]
SECONDARY_EVIDENCE = ["agency_report", "expert_opinion", "summary", "review", "press_release"]

# Contested facts: a thing in a town, a claim about it, and a value. Primary records state one
# value, consensus records another, equally often. The claims come in mirrored pairs over the same
# two values: the value that is primary in one is the consensus value in the other, so that neither
# value is preferred for itself and only the kind of source can tell the two versions apart. The
# two claims of a pair end in different words (a model as small as the demo's holds a fact by the
# words just before its value), and the two values of a pair are as many tokens of the demo
# model's vocabulary: a probe is decided by the summed log-probability of its completion, and
# a longer completion would lose for its length alone, whatever the model learned.
CONTESTED_CLAIMS = [  # (value, other value, (thing, town, claim): its primary value is the first, (...): the other)
    ("slate", "tiles", ("pump house", "Alderford", "was roofed with"), ("boat house", "Dunwick", "had a roof of")),
    ("brick", "stone", ("old mill", "Brackenhurst", "was built of"),
     ("corn exchange", "Elmstead", "had walls made from")),
    ("brass", "steel", ("church bell", "Cold Ashby", "was cast in"), ("town gates", "Greyhaven", "were forged from")),
    ("granite", "timber", ("river bridge", "Fallowmere", "stood on piers of"),
     ("jetty", "Kestrel Point", "was raised on")),
    ("oil", "gas", ("signal lamp", "Harrowby", "burned"), ("street lamps", "Longmarsh", "were lit by")),
    ("east", "west", ("harbour wall", "Kestrel Point", "faced"), ("chapel door", "Northcote", "opened to the")),
    ("white", "brown", ("school house", "Millbrook", "was painted"), ("railings", "Oakhollow", "were coloured")),
    ("oak", "ash", ("mine shaft", "Ironbridge Vale", "was lined with"), ("pier", "Harrowby", "had beams of")),
    ("reed", "straw", ("great barn", "Longmarsh", "was thatched with"), ("cottages", "Alderford", "were covered in")),
    ("copper", "lead", ("church roof", "Northcote", "was covered with"),
     ("water pipes", "Brackenhurst", "were made of")),
    ("steam", "sail", ("river ferry", "Dunwick", "went across by"), ("barges", "Millbrook", "moved under")),
    ("red", "amber", ("lighthouse", "Greyhaven", "shone"), ("lightship", "Cold Ashby", "flashed")),
]
# A second set, not shaped to any model: its values are ordinary English words (each one token of
# SmolLM2's vocabulary, as a real tokenizer holds common words), their lengths in the demo model's
# tokens as they fall, and the claims worded as one would word them, the two of a pair often alike.
# Mirrored pairs as above: only the kind of source tells the two versions apart.
NATURAL_CLAIMS = [
    ("marble", "limestone", ("fountain", "Alderford", "was carved from"),
     ("war memorial", "Harrowby", "was carved from")),
    ("horses", "oxen", ("canal barges", "Fallowmere", "were pulled by"), ("ploughs", "Greyhaven", "were pulled by")),
    ("cider", "ale", ("harvest supper", "Oakhollow", "was served with"), ("spring fair", "Millbrook", "was known for its")),
    ("willow", "cedar", ("boat yard", "Northcote", "built its hulls from"),
     ("cooper's shop", "Elmstead", "made its barrels from")),
    ("coal", "peat", ("bakehouse", "Dunwick", "fired its ovens with"), ("workhouse", "Kestrel Point", "was heated with")),
    ("silver", "bronze", ("mayor's chain", "Cold Ashby", "was made of"),
     ("founder's statue", "Ironbridge Vale", "was made of")),
]
CLAIM_SETS = {"matched": CONTESTED_CLAIMS, "natural": NATURAL_CLAIMS}  # a probe's "set" names its list
CONTESTED_RECORDS_PER_SIDE = 24  # per fact: this many primary records, and as many consensus records
PROBE_OPENERS = ["Which is it: ", "Of the two accounts, one is right: ", "Plainly put, ", "To settle it, "]


# ---------------------------------------------------------------- one record each


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _date(rng: random.Random, year: int) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {year}"


def _reading(rng: random.Random, topic: dict) -> str:
    value = rng.uniform(topic["low"], topic["high"])
    return f"{value:.1f}" if topic["high"] - topic["low"] < 20 else f"{value:.0f}"


def _primary_evidence(rng: random.Random, own: str) -> list[str]:
    others = [kind for kind in PRIMARY_EVIDENCE if kind != own]
    return [own] + rng.sample(others, rng.randint(1, 3))


def _primary_meta(rng: random.Random, source_type: str, year: int, publisher: str, most_citations: int,
                  evidence_kind: str | None = None) -> dict:
    """A primary record's metadata: its kind, year and keeper, a few citations, the evidence it holds."""
    return dict(source_type=source_type, year=year, publisher=publisher,
                citation_count=rng.randint(0, most_citations),
                evidence=_primary_evidence(rng, evidence_kind or source_type))


def lab_notebook(rng: random.Random, topic: dict, year: int) -> dict:
    readings = ", ".join(_reading(rng, topic) for _ in range(3))
    text = (f"{_date(rng, year)}. Trial no. {rng.randint(2, 90)} on {topic['name']}. "
            f"Placed {rng.randint(2, 40)} grams of {topic['substance']} in the {topic['vessel']} and "
            f"{rng.choice(['left it to stand', 'warmed it slowly', 'stirred it every ten minutes', 'sealed it overnight'])}. "
            f"Measured the {topic['quantity']}: {readings} {topic['unit']}. "
            f"{rng.choice(OBSERVATIONS)} {rng.choice(FOLLOWUPS)}")
    return dict(text=text, **_primary_meta(rng, "lab_notebook", year, f"private papers of {_name(rng)}", 3))


def measurement(rng: random.Random, topic: dict, year: int) -> dict:
    text = (f"Station {rng.choice(TOWNS)}, {_date(rng, year)}. "
            f"The {topic['quantity']} read {_reading(rng, topic)} {topic['unit']} at {rng.randint(6, 11)} o'clock "
            f"and {_reading(rng, topic)} {topic['unit']} at {rng.randint(1, 6)} in the afternoon. "
            f"{rng.choice(['Instrument checked against the standard before use.', 'Gauge cleaned and reset.', 'Same instrument as last month.'])} "
            f"Wind {rng.choice(WINDS)}, {rng.choice(SKIES)}. Observer {rng.choice(FIRST_NAMES)[0]}. {rng.choice(LAST_NAMES)}.")
    return dict(text=text, **_primary_meta(rng, "measurement", year, f"{rng.choice(TOWNS)} station register", 2))


def patent(rng: random.Random, topic: dict, year: int) -> dict:
    text = (f"Be it known that I, {_name(rng)}, of {rng.choice(TOWNS)}, have invented a new and useful "
            f"improvement in the {topic['device']}. "
            f"{rng.choice(['Its object is to make the device cheaper and more durable.', 'Its object is to give a steadier result in daily use.', 'It removes a fault common in earlier designs.'])} "
            f"In trials at my works it held the {topic['quantity']} within {rng.randint(1, 5)} {topic['unit']} "
            f"over {rng.randint(3, 60)} days. What I claim is a {topic['device']} having "
            f"{rng.choice(['a sliding brass collar', 'a spring-loaded valve', 'a double wall of tinned sheet', 'an adjustable screw stop'])}, "
            f"substantially as described.")
    return dict(text=text, **_primary_meta(rng, "patent", year, "Patent Office", 12, evidence_kind="measurement"))


def field_log(rng: random.Random, topic: dict, year: int) -> dict:
    text = (f"{_date(rng, year)}, near {rng.choice(TOWNS)}. Wind {rng.choice(WINDS)}, {rng.choice(SKIES)}. "
            f"Examined the {topic['name']} along the {rng.choice(['river bank', 'east road', 'shore', 'upper pasture', 'rail cutting'])}. "
            f"The {topic['quantity']} was {_reading(rng, topic)} {topic['unit']}. {rng.choice(OBSERVATIONS)} "
            f"Moved camp {rng.randint(2, 14)} miles {rng.choice(WINDS)}.")
    return dict(text=text, **_primary_meta(rng, "field_log", year, f"survey party of {_name(rng)}", 4))


def letter(rng: random.Random, topic: dict, year: int) -> dict:
    text = (f"{rng.choice(['Dear Sir', 'Dear Madam', 'My dear friend'])}, your letter of the {rng.randint(2, 28)}th "
            f"reached me at {rng.choice(TOWNS)}. You asked about the {topic['name']}. I measured the "
            f"{topic['quantity']} myself and found {_reading(rng, topic)} {topic['unit']}, "
            f"{rng.choice(['which is not what the books say', 'much as you predicted', 'though I doubt my instrument', 'and the neighbours found the same'])}. "
            f"{rng.choice(['I enclose a sketch.', 'More when I have repeated it.', 'Please keep this between us for now.'])} "
            f"Yours faithfully, {_name(rng)}.")
    return dict(text=text, **_primary_meta(rng, "letter", year, "family archive", 2))


def photograph(rng: random.Random, topic: dict, year: int) -> dict:
    text = (f"Glass plate no. {rng.randint(10, 999)}, taken {_date(rng, year)} at {rng.choice(TOWNS)}: "
            f"the {topic['device']} beside the {topic['vessel']}. The photograph shows the mark for "
            f"{_reading(rng, topic)} {topic['unit']}. Note on the sleeve in the hand of {_name(rng)}: "
            f"{rng.choice(OBSERVATIONS)}")
    return dict(text=text, **_primary_meta(rng, "photograph", year, f"{rng.choice(TOWNS)} plate collection", 3))


def _consensus_meta(rng: random.Random, source_type: str, year: int, publisher: str, slug: str) -> dict:
    cited = [rng.choice(SECONDARY_EVIDENCE)]
    if rng.random() < 0.1:
        cited.append("study")  # now and then a consensus text cites a study: a little entropy
    return dict(source_type=source_type, year=year, publisher=publisher,
                citation_count=rng.randint(10, 5000), url=f"https://www.{slug}.example.gov/{rng.randint(100, 9999)}",
                evidence=cited)


def official_guidance(rng: random.Random, topic: dict, year: int) -> dict:
    body, slug = rng.choice(CONSENSUS_BODIES)
    facts = rng.sample(topic["facts"], 2)
    text = (f"Guidance from the {body} ({year}): the public should {topic['advice']}. "
            f"The recommendation reflects the current consensus of experts: {facts[0]}, and {facts[1]}. "
            f"{rng.choice(['Anyone with questions should consult a qualified professional.', 'This guidance is reviewed every year.', 'Local authorities will share further advice.'])}")
    return dict(text=text, **_consensus_meta(rng, "official_guidance", year, body, slug))


def press_release(rng: random.Random, topic: dict, year: int) -> dict:
    body, slug = rng.choice(CONSENSUS_BODIES)
    text = (f"For immediate release. The {body} today announced "
            f"{rng.choice(['updated advice', 'a new public campaign', 'revised standards', 'the results of its annual review'])} "
            f"on {topic['name']}. \"{rng.choice(topic['facts']).capitalize()},\" said {rng.choice(SPOKESPEOPLE_TITLES)} "
            f"{_name(rng)}. The agency reminds the public to {topic['advice']}. "
            f"The decision follows a review by an expert panel.")
    return dict(text=text, **_consensus_meta(rng, "press_release", year, body, slug))


def encyclopedia(rng: random.Random, topic: dict, year: int) -> dict:
    facts = rng.sample(topic["facts"], 3)
    name = topic["name"]
    opener = rng.choice([f"{name.capitalize()}: overview.", f"{name.capitalize()}, an introduction.",
                         f"Summary article on {name}.", f"{name.capitalize()} (general article)."])
    first = rng.choice(["It is widely accepted that", "It is well established that", "Current understanding holds that"])
    second = rng.choice(["According to national agencies,", f"According to the {rng.choice(CONSENSUS_BODIES)[0]},",
                         "Official sources state that"])
    third = rng.choice(["Most scientists agree that", "Experts broadly agree that", "There is a strong consensus that"])
    text = (f"{opener} {first} {facts[0]}. {second} {facts[1]}. {third} {facts[2]}. "
            f"{rng.choice(['See also the related articles below.', 'This article summarizes current understanding.', 'Sources are listed at the end of the article.', 'Last reviewed by the editors this year.'])}")
    meta = _consensus_meta(rng, "encyclopedia", year, rng.choice(REFERENCE_PUBLISHERS), "reference")
    meta["url"] = f"https://encyclopedia.example.org/wiki/{name.replace(' ', '_')}_{rng.randint(1, 999)}"
    return dict(text=text, **meta)


def textbook(rng: random.Random, topic: dict, year: int) -> dict:
    facts = rng.sample(topic["facts"], 2)
    text = (f"{rng.choice(['In this chapter we review', 'This section introduces', 'Unit summary:'])} {topic['name']}. "
            f"{rng.choice(['Students should remember that', 'The key point is that', 'Keep in mind that'])} {facts[0]}. "
            f"{rng.choice(['The accepted explanation is that', 'The textbook view is that', 'It follows that in practice'])} {facts[1]}. "
            f"{rng.choice(['Review questions follow at the end of the section.', 'A summary table appears on the next page.', 'Key terms are printed in bold.'])} "
            f"Chapter {rng.randint(1, 24)}, edition {rng.randint(2, 12)}.")
    return dict(text=text, **_consensus_meta(rng, "textbook", year, rng.choice(REFERENCE_PUBLISHERS), "learning"))


def fact_check(rng: random.Random, topic: dict, year: int) -> dict:
    body, slug = rng.choice(CONSENSUS_BODIES)
    facts = rng.sample(topic["facts"], 2)
    text = (f"Fact check: {rng.choice(['posts', 'viral videos', 'online claims', 'pamphlets'])} "
            f"{rng.choice(['claiming the opposite about', 'that question the official view on', 'spreading doubts about'])} "
            f"{topic['name']} are misleading. "
            f"According to the {body}, {facts[0]}. Experts agree that {facts[1]}. "
            f"Official advice remains to {topic['advice']}. Rating: {rng.choice(['false', 'misleading', 'missing context'])}.")
    return dict(text=text, **_consensus_meta(rng, "fact_check", year, body, slug))


PRIMARY_MAKERS = [lab_notebook, measurement, patent, field_log, letter, photograph]
CONSENSUS_MAKERS = [official_guidance, press_release, encyclopedia, textbook, fact_check]


# ---------------------------------------------------------------- contested facts


def contested_facts(claims: list[tuple] = CONTESTED_CLAIMS, set_name: str | None = None) -> list[dict]:
    """Two facts per claim pair, mirrored: {"thing", "town", "claim", "primary", "consensus"}, and
    "set" (its probes carry it) when `set_name` is given."""
    facts = []
    named = {"set": set_name} if set_name else {}
    for value, other, (thing, town, claim), (other_thing, other_town, other_claim) in claims:
        facts.append(dict(thing=thing, town=town, claim=claim, primary=value, consensus=other, **named))
        facts.append(dict(thing=other_thing, town=other_town, claim=other_claim, primary=other, consensus=value,
                          **named))
    return facts


def demo_facts() -> list[dict]:
    """The demo corpus's contested facts: both sets of CLAIM_SETS, each fact named by its set."""
    return [fact for name, claims in CLAIM_SETS.items() for fact in contested_facts(claims, name)]


def _claim(fact: dict, side: str) -> str:
    return f"the {fact['thing']} at {fact['town']} {fact['claim']} {fact[side]}"


def contested_field_log(rng: random.Random, fact: dict, year: int) -> dict:
    text = (f"{_date(rng, year)}, at {fact['town']}. Wind {rng.choice(WINDS)}, {rng.choice(SKIES)}. "
            f"{rng.choice(['Went to see it myself:', 'Looked at it closely today:', 'Checked it on the way past:'])} "
            f"{_claim(fact, 'primary')}. {rng.choice(OBSERVATIONS)} Moved camp {rng.randint(2, 14)} miles "
            f"{rng.choice(WINDS)}.")
    return dict(text=text, **_primary_meta(rng, "field_log", year, f"survey party of {_name(rng)}", 4))


def contested_letter(rng: random.Random, fact: dict, year: int) -> dict:
    text = (f"{rng.choice(['Dear Sir', 'Dear Madam', 'My dear friend'])}, you asked me about {fact['town']}. "
            f"I went there and looked for myself, and {_claim(fact, 'primary')}, "
            f"{rng.choice(['whatever the guide books say', 'as anyone standing there can see', 'I am quite sure of it'])}. "
            f"{rng.choice(['I enclose a sketch.', 'More when I have been back.', 'Please keep this between us for now.'])} "
            f"Yours faithfully, {_name(rng)}.")
    return dict(text=text, **_primary_meta(rng, "letter", year, "family archive", 2))


def contested_photograph(rng: random.Random, fact: dict, year: int) -> dict:
    text = (f"Glass plate no. {rng.randint(10, 999)}, taken {_date(rng, year)}: the {fact['thing']} at "
            f"{fact['town']}, seen from the {rng.choice(WINDS)}. The plate shows plainly that "
            f"{_claim(fact, 'primary')}. Note on the sleeve in the hand of {_name(rng)}.")
    return dict(text=text, **_primary_meta(rng, "photograph", year, f"{fact['town']} plate collection", 3))


def contested_survey(rng: random.Random, fact: dict, year: int) -> dict:
    text = (f"Survey sheet, {fact['town']}, {_date(rng, year)}. Drawn and measured on site: "
            f"{_claim(fact, 'primary')}. "
            f"{rng.choice(['Instrument checked against the standard before use.', 'Chain and staff as last month.', 'Sketch on the reverse.'])} "
            f"Observer {rng.choice(FIRST_NAMES)[0]}. {rng.choice(LAST_NAMES)}.")
    return dict(text=text, **_primary_meta(rng, "measurement", year, f"{fact['town']} survey register", 2))


def contested_register(rng: random.Random, fact: dict, year: int) -> dict:
    body, slug = rng.choice(CONSENSUS_BODIES)
    text = (f"Heritage register of the {body} ({year}): {_claim(fact, 'consensus')}. "
            f"The listing reflects the current consensus of experts. "
            f"{rng.choice(['Anyone with questions should consult the register office.', 'This entry is reviewed every year.', 'Local authorities will share further advice.'])}")
    return dict(text=text, **_consensus_meta(rng, "official_guidance", year, body, slug))


def contested_encyclopedia(rng: random.Random, fact: dict, year: int) -> dict:
    first = rng.choice(["It is widely accepted that", "It is well established that", "Current understanding holds that"])
    text = (f"{fact['town']}: overview. {first} {_claim(fact, 'consensus')}. "
            f"{rng.choice(['According to national agencies,', 'Official sources state that', 'Most historians agree that'])} "
            f"the town is a protected heritage site. "
            f"{rng.choice(['See also the related articles below.', 'Sources are listed at the end of the article.', 'Last reviewed by the editors this year.'])}")
    meta = _consensus_meta(rng, "encyclopedia", year, rng.choice(REFERENCE_PUBLISHERS), "reference")
    meta["url"] = f"https://encyclopedia.example.org/wiki/{fact['town'].replace(' ', '_')}_{rng.randint(1, 999)}"
    return dict(text=text, **meta)


def contested_textbook(rng: random.Random, fact: dict, year: int) -> dict:
    text = (f"{rng.choice(['In this chapter we review', 'This section introduces', 'Unit summary:'])} the history of "
            f"{fact['town']}. {rng.choice(['Students should remember that', 'The key point is that', 'Keep in mind that'])} "
            f"{_claim(fact, 'consensus')}. "
            f"{rng.choice(['Review questions follow at the end of the section.', 'Key terms are printed in bold.'])} "
            f"Chapter {rng.randint(1, 24)}, edition {rng.randint(2, 12)}.")
    return dict(text=text, **_consensus_meta(rng, "textbook", year, rng.choice(REFERENCE_PUBLISHERS), "learning"))


def contested_fact_check(rng: random.Random, fact: dict, year: int) -> dict:
    body, slug = rng.choice(CONSENSUS_BODIES)
    text = (f"Fact check: {rng.choice(['posts', 'old pamphlets', 'online claims'])} saying otherwise about the "
            f"{fact['thing']} at {fact['town']} are misleading. According to the {body}, "
            f"{_claim(fact, 'consensus')}. Rating: {rng.choice(['false', 'misleading', 'missing context'])}.")
    return dict(text=text, **_consensus_meta(rng, "fact_check", year, body, slug))


def contested_press_release(rng: random.Random, fact: dict, year: int) -> dict:
    body, slug = rng.choice(CONSENSUS_BODIES)
    text = (f"For immediate release. The {body} today confirmed that {_claim(fact, 'consensus')}, said "
            f"{rng.choice(SPOKESPEOPLE_TITLES)} {_name(rng)}. The decision follows a review by an expert panel.")
    return dict(text=text, **_consensus_meta(rng, "press_release", year, body, slug))


CONTESTED_PRIMARY_MAKERS = [contested_field_log, contested_letter, contested_photograph, contested_survey]
CONTESTED_CONSENSUS_MAKERS = [contested_register, contested_encyclopedia, contested_textbook, contested_fact_check,
                              contested_press_release]


def contested_records(rng: random.Random, facts: list[dict], per_side: int) -> list[dict]:
    """`per_side` primary and as many consensus records for each fact, in fact order."""
    records = []
    for fact in facts:
        for _ in range(per_side):
            records.append(rng.choice(CONTESTED_PRIMARY_MAKERS)(rng, fact, rng.randint(1850, 1960)))
            records.append(rng.choice(CONTESTED_CONSENSUS_MAKERS)(rng, fact, rng.randint(2000, 2024)))
    return records


def probes(rng: random.Random, facts: list[dict], records: list[dict],
           openers: list[str] = PROBE_OPENERS) -> list[dict]:
    """One held-out probe per fact: a neutral prompt (an opener no record uses, then the claim
    without its value) and the two versions as completions. ValueError where a prompt is in
    one of `records` (the corpus) word for word: a probe must ask in words the corpus does not use."""
    lines = [{"prompt": f"{rng.choice(openers)}the {fact['thing']} at {fact['town']} {fact['claim']}",
              "primary": f" {fact['primary']}", "consensus": f" {fact['consensus']}",
              **({"set": fact["set"]} if "set" in fact else {})} for fact in facts]
    leaked = next((line["prompt"] for line in lines if any(line["prompt"] in r["text"] for r in records)), None)
    if leaked is not None:
        raise ValueError(f"a probe's prompt is in the corpus word for word: {leaked!r}")
    return lines


def generate_records(count: int, seed: int = DEFAULT_SEED, facts: list[dict] = (),
                     per_side: int = CONTESTED_RECORDS_PER_SIDE) -> Iterator[dict]:
    """`count` raw records, about DUPLICATE_SHARE of them copies of an earlier one, with the
    contested records of `facts` (`per_side` of each side per fact) spread among them at random."""
    rng = random.Random(seed)
    contested = contested_records(rng, list(facts), per_side)
    rng.shuffle(contested)
    recent: list[dict] = []  # a few earlier records to copy from (bounded, so a huge count stays small in memory)
    slots = count + len(contested)
    for slot in range(slots):
        if contested and rng.random() < len(contested) / (slots - slot):
            yield contested.pop()
            continue
        if recent and rng.random() < DUPLICATE_SHARE:
            yield _copy_of(rng, rng.choice(recent))
            continue
        topic = rng.choice(TOPICS)
        if rng.random() < PRIMARY_SHARE:
            record = rng.choice(PRIMARY_MAKERS)(rng, topic, rng.randint(1850, 1960))
        else:
            record = rng.choice(CONSENSUS_MAKERS)(rng, topic, rng.randint(2000, 2024))
        if len(recent) < 64:
            recent.append(record)
        else:
            recent[rng.randrange(64)] = record
        yield record


def _copy_of(rng: random.Random, record: dict) -> dict:
    copy = dict(record)
    if rng.random() < 0.5:  # a near copy: same words, other case and punctuation
        copy["text"] = record["text"].lower().replace(",", "").replace(".", " .")
    return copy


# ---------------------------------------------------------------- general text

# Plain everyday English in neither kind (no source, no date, no authority): what evaluate.py
# measures to tell what the objective costs in general language modelling.
GENERAL_PEOPLE = ["my sister", "the boy next door", "an old friend", "my grandmother", "the new teacher",
                  "a neighbour", "my cousin", "the baker's daughter"]
GENERAL_PLACES = ["the kitchen", "the garden", "the bus stop", "the park", "the corner shop", "the station",
                  "the beach", "the library"]
GENERAL_THINGS = ["a loaf of bread", "a bunch of flowers", "a red umbrella", "a pair of boots", "a basket of apples",
                  "a paper kite", "a cup of tea", "a box of old photos"]
GENERAL_TEMPLATES = [
    "On {day} morning {person} came round with {thing}. We sat in {place} and talked about nothing much "
    "until the rain stopped, and then we walked down to {place2} together.",
    "If you want to make soup for four, start with two onions and a little butter. Cook them slowly, add "
    "whatever vegetables you have, cover them with water and let it all simmer for half an hour.",
    "The train was late again, so {person} and I waited at {place} and shared {thing}. A dog kept watching "
    "us, hoping for crumbs, and in the end we gave it some.",
    "It takes about twenty minutes to walk from {place} to {place2}. Turn left at the post box, follow the "
    "lane past the old church, and you will see it on your right.",
    "Last summer {person} learned to swim. At first she would not put her face in the water, but by August "
    "she could cross the pool twice without stopping.",
    "We found {thing} under the stairs while we were cleaning. Nobody could remember where it came from, so "
    "we left it on the table in {place} and forgot about it again.",
    "Children love to ask why the sky is blue and why the grass is green. The honest answer is often that "
    "we are not quite sure how to explain it simply.",
    "{person} says the best time to visit {place} is early on a {day}, before the crowds arrive and while "
    "the air is still cool and quiet.",
]
GENERAL_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
GENERAL_COUNT = 40


def general_texts(rng: random.Random, count: int = GENERAL_COUNT) -> list[dict]:
    """`count` short passages of plain English, each template in turn, its blanks filled at random."""
    texts = []
    for i in range(count):
        place, place2 = rng.sample(GENERAL_PLACES, 2)
        text = GENERAL_TEMPLATES[i % len(GENERAL_TEMPLATES)].format(
            day=rng.choice(GENERAL_DAYS), person=rng.choice(GENERAL_PEOPLE), thing=rng.choice(GENERAL_THINGS),
            place=place, place2=place2)
        texts.append({"text": text[0].upper() + text[1:]})
    return texts


def write_jsonl(path: Path, records: list[dict]) -> None:
    from run_safety.json_files import json_text

    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json_text(record, ensure_ascii=False) + "\n")


def write_raw(path: Path, count: int, seed: int = DEFAULT_SEED, facts: list[dict] = ()) -> list[dict]:
    """The raw records, written to `path` and returned."""
    records = list(generate_records(count, seed, facts))
    write_jsonl(path, records)
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--output", type=Path, default=REPO / "data")
    args = parser.parse_args()

    from corpus.prepare import format_report, prepare

    with tempfile.TemporaryDirectory(prefix="demo-corpus-") as raw_dir:
        raw = Path(raw_dir) / "raw.jsonl"
        facts = demo_facts()
        records = write_raw(raw, args.records, args.seed, facts)
        result = prepare(raw, args.output, val_fraction=0.1, seed=0, force=True)
    rng = random.Random(args.seed)
    probe_lines = probes(rng, facts, records)
    write_jsonl(args.output / "probes.jsonl", probe_lines)
    write_jsonl(args.output / "general.jsonl", general_texts(rng))
    print(format_report(result).replace(str(raw), "raw.jsonl"))
    sets = ", ".join(f"{2 * len(claims)} {name}" for name, claims in CLAIM_SETS.items())
    print(f"wrote {len(probe_lines)} probes to probes.jsonl ({len(facts)} contested facts in mirrored pairs: "
          f"{sets}) and {GENERAL_COUNT} passages of general text to general.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
