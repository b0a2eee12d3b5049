"""WordNet 3.0 (Princeton) from Debian's `wordnet-base` package: the demo's forgetting benchmarks and held-out text.

The package (`oplora.artifacts`: pinned version and sha256) holds WordNet's database files. This module reads them
straight from the `.deb` (an `ar` archive whose `data.tar.xz` has `usr/share/wordnet/data.{noun,verb,adj,adv}` and
`cntlist.rev`) and builds multiple-choice tasks that lm_eval serves from local YAMLs (`oplora:wordnet-tasks`):

- `wordnet_definitions` (reverse dictionary): a synset's gloss → its most frequent one-word lemma;
- `wordnet_hypernyms`: "A poodle is a kind of" → the direct hypernym's most frequent one-word lemma;
- `wordnet_antonyms`: "The opposite of hot is" → a direct antonym (adjectives, verbs, adverbs, nouns);
- `wordnet_examples`: a quoted example sentence with its word blanked → the word.

Every question has four choices: the answer and three distractors of the same part of speech from the same
frequency band (the SemCor tag counts of `cntlist.rev`), none of them a synonym of the answer, none a word of the
prompt, none related to the question word by the relation asked about. The examples are shuffled with a fixed seed.
`heldout.jsonl` holds example sentences of synsets that no question uses: natural English on which the KL stage
(`oplora.evaluation.drift`) compares the tuned model's next-token distributions with the base model's.

The prompts are plain sentences, sharing nothing with the fine-tuning prompt (Alpaca's "### Instruction:").
`scripts/select_demo_tasks.py` measures the base model on every task; the demo's eval config names the tasks it
answers above chance by at least 4 standard errors (`results/demo/task_selection.md`).
"""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from oplora import artifacts
from oplora.cache import Cache
from oplora.demo_data import MC_TASK
from oplora.io import build_once, file_sha256

VERSION = 3
SEED = 233
QUESTIONS = 2000  # per task, at most; the demo reads the first `eval.lm_eval.limit`
HELDOUT = 512
CHOICES = 4
BAND = 200  # distractors come from the words of the same part of speech at most this many frequency ranks away
MIN_COUNT = 2  # a word is a candidate answer or distractor when SemCor tags its senses at least this often
POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
SENSE_POS = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}  # sense keys' ss_type → the file it lives in
WORD = re.compile(r"^[a-z]+$")
TASKS = ("wordnet_definitions", "wordnet_hypernyms", "wordnet_antonyms", "wordnet_examples")


@dataclass
class Synset:
    offset: str
    pos: str  # n, v, a, r (satellites `s` filed as `a`)
    lemmas: list[str]  # as written (proper nouns capitalised), markers like "(a)" removed, underscores kept
    pointers: list[tuple[str, str, str, int, int]]  # (symbol, offset, pos, source word no., target word no.)
    gloss: str
    examples: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return self.pos, self.offset


def deb_members(path: Path, wanted: set[str]) -> dict[str, bytes]:
    """{name: bytes} of the files `wanted` (paths as the package installs them, without "./") in a `.deb`."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{path} is not a Debian package (no ar header)")
    at, data = 8, None
    while at + 60 <= len(raw):
        name, size = raw[at:at + 16].decode().strip().rstrip("/"), int(raw[at + 48:at + 58])
        if name.startswith("data.tar"):
            data = raw[at + 60:at + 60 + size]
        at += 60 + size + (size % 2)
    if data is None:
        raise ValueError(f"{path} has no data.tar member")
    found = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name in wanted:
                found[name] = tar.extractfile(member).read()
    if missing := sorted(wanted - set(found)):
        raise ValueError(f"{path} does not contain {missing}")
    return found


def split_gloss(text: str) -> tuple[str, list[str]]:
    """A data line's gloss: the definition and the quoted example sentences (`; "…"`)."""
    examples = re.findall(r'"([^"]+)"', text)
    definition = re.split(r';\s*"', text, maxsplit=1)[0].strip().rstrip(";").strip()
    return definition, [e.strip() for e in examples]


def parse_data(text: str, pos: str) -> list[Synset]:
    """WordNet's `data.<pos>` format (wndb(5WN)): offset lex_filenum ss_type w_cnt (word lex_id)… p_cnt
    (symbol offset pos source/target)… [frames] | gloss."""
    synsets = []
    for line in text.splitlines():
        if not line or line.startswith("  "):  # the licence header
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        count = int(fields[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", w) for w in fields[4:4 + 2 * count:2]]
        at = 4 + 2 * count
        pointers = []
        for i in range(int(fields[at])):
            symbol, target, target_pos, st = fields[at + 1 + 4 * i:at + 5 + 4 * i]
            pointers.append((symbol, target, "a" if target_pos == "s" else target_pos, int(st[:2], 16),
                             int(st[2:], 16)))
        definition, examples = split_gloss(gloss)
        synsets.append(Synset(fields[0], pos, lemmas, pointers, definition, examples))
    return synsets


def parse_index(text: str, pos: str) -> dict[tuple[str, str], str]:
    """{(word, pos): the offset of its most frequent sense} from `index.<pos>`, whose lines list a word's synsets in
    order of sense frequency (lemma pos synset_cnt p_cnt [ptr_symbol]… sense_cnt tagsense_cnt synset_offset…)."""
    first = {}
    for line in text.splitlines():
        if line and not line.startswith("  "):
            fields = line.split()
            first[fields[0], pos] = fields[-int(fields[2])]
    return first


def parse_counts(text: str) -> dict[tuple[str, str], int]:
    """{(word, pos): SemCor tag count summed over its senses} from `cntlist.rev` (sense_key sense_number tag_cnt)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for line in text.splitlines():
        key, _, tags = line.split()
        word, _, rest = key.partition("%")
        counts[word, SENSE_POS[rest[0]]] += int(tags)
    return counts


class WordNet:
    """The synsets of all four parts of speech, by (pos, offset), and each word's frequency."""

    PARTS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
    FILES = {f"usr/share/wordnet/{kind}.{name}" for name in PARTS.values() for kind in ("data", "index")}

    def __init__(self, deb: Path):
        files = {Path(k).name: v.decode("utf-8")
                 for k, v in deb_members(deb, self.FILES | {"usr/share/wordnet/cntlist.rev"}).items()}
        self.synsets = {s.key: s for pos, name in self.PARTS.items() for s in parse_data(files[f"data.{name}"], pos)}
        self.first_sense = {k: v for pos, name in self.PARTS.items()
                            for k, v in parse_index(files[f"index.{name}"], pos).items()}
        self.counts = parse_counts(files["cntlist.rev"])
        self.senses: dict[tuple[str, str], list[Synset]] = defaultdict(list)
        self.words = {(w, s.pos) for s in self.synsets.values() for w in s.lemmas if WORD.match(w)}  # no names
        for synset in self.synsets.values():
            for lemma in synset.lemmas:
                self.senses[lemma.lower(), synset.pos].append(synset)

    def count(self, word: str, pos: str) -> int:
        return self.counts.get((word, pos), 0)

    def head(self, synset: Synset) -> str | None:
        """The synset's most frequent one-word lemma, when it is frequent enough to ask about and this synset is the
        word's most frequent sense (a question about a rare sense of a common word would be unfair)."""
        words = [w for w in synset.lemmas if WORD.match(w) and self.count(w, synset.pos) >= MIN_COUNT
                 and self.first_sense.get((w, synset.pos)) == synset.offset]
        return max(words, key=lambda w: (self.count(w, synset.pos), -synset.lemmas.index(w)), default=None)

    def related(self, word: str, pos: str) -> set[str]:
        """The word, its synonyms and the lemmas of the synsets its senses point to (any relation): never a
        distractor for a question about `word`."""
        out = {word}
        for synset in self.senses[word, pos]:
            out.update(w.lower() for w in synset.lemmas)
            for _, offset, target_pos, _, _ in synset.pointers:
                out.update(w.lower() for w in self.synsets[target_pos, offset].lemmas)
        return out


class Distractors:
    """Words of one part of speech ranked by frequency; `pick` draws from the answer's frequency band."""

    def __init__(self, wordnet: WordNet):
        self.wordnet = wordnet
        self.ranked = {pos: sorted((w for (w, p), c in wordnet.counts.items() if p == pos and (w, p) in wordnet.words
                                    and c >= MIN_COUNT), key=lambda w: (-wordnet.count(w, pos), w))
                       for pos in ("n", "v", "a", "r")}
        self.rank = {pos: {w: i for i, w in enumerate(words)} for pos, words in self.ranked.items()}

    def pick(self, rng: random.Random, answer: str, pos: str, avoid: set[str], text: str) -> list[str] | None:
        at = self.rank[pos].get(answer)
        if at is None:  # not a frequent lowercase word of this part of speech
            return None
        blocked = avoid | self.wordnet.related(answer, pos) | words(text)
        pool = [w for w in self.ranked[pos][max(0, at - BAND):at + BAND] if w not in blocked]
        return rng.sample(pool, CHOICES - 1) if len(pool) >= CHOICES - 1 else None


def lower(lemmas: list[str]) -> set[str]:
    return {w.lower() for w in lemmas}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def question(rng: random.Random, prompt: str, answer: str, distractors: list[str], item: str) -> dict:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"id": item, "prompt": prompt, "choices": choices, "label": choices.index(answer)}


def definitions(wordnet: WordNet, distractors: Distractors, rng: random.Random) -> list[dict]:
    """'"a large natural stream of water" is the meaning of the word' → river."""
    out = []
    for synset in wordnet.synsets.values():
        answer = wordnet.head(synset)
        prompt = f'"{synset.gloss}" is the meaning of the word'
        if not answer or len(synset.gloss) < 12:
            continue
        if picked := distractors.pick(rng, answer, synset.pos, lower(synset.lemmas), prompt):
            out.append(question(rng, prompt, answer, picked, f"{synset.pos}{synset.offset}"))
    return out


def hypernyms(wordnet: WordNet, distractors: Distractors, rng: random.Random) -> list[dict]:
    """'A poodle is a kind of' → dog (nouns; the direct hypernym's head word)."""
    out = []
    for synset in wordnet.synsets.values():
        word = wordnet.head(synset)
        parents = [wordnet.synsets["n", o] for s, o, _, _, _ in synset.pointers if s == "@" and synset.pos == "n"]
        answer = wordnet.head(parents[0]) if word and len(parents) == 1 else None
        if not answer or answer == word:
            continue
        ancestors = ancestor_words(wordnet, synset)
        prompt = f"{article(word)} {word} is a kind of"
        if picked := distractors.pick(rng, answer, "n", ancestors | lower(synset.lemmas), prompt):
            out.append(question(rng, prompt, answer, picked, f"n{synset.offset}"))
    return out


def ancestor_words(wordnet: WordNet, synset: Synset) -> set[str]:
    """Every lemma on the hypernym paths above a noun synset (also a right answer to "is a kind of")."""
    words, todo, seen = set(), [synset], set()
    while todo:
        for symbol, offset, _, _, _ in todo.pop().pointers:
            if symbol in ("@", "@i") and offset not in seen:
                seen.add(offset)
                parent = wordnet.synsets["n", offset]
                words.update(w.lower() for w in parent.lemmas)
                todo.append(parent)
    return words


def antonyms(wordnet: WordNet, distractors: Distractors, rng: random.Random) -> list[dict]:
    """'The opposite of hot is' → cold (direct antonyms, a lexical pointer `!` from one word to another)."""
    out, asked = [], set()
    for synset in wordnet.synsets.values():
        for symbol, offset, target_pos, source, target in synset.pointers:
            if symbol != "!" or not source or not target:
                continue
            word, answer = synset.lemmas[source - 1], wordnet.synsets[target_pos, offset].lemmas[target - 1]
            if (word, synset.pos) in asked or not all(WORD.match(w) and wordnet.count(w, synset.pos) >= MIN_COUNT
                                                     for w in (word, answer)):
                continue
            asked.add((word, synset.pos))
            prompt = f"The opposite of {word} is"
            if picked := distractors.pick(rng, answer, synset.pos, {word} | wordnet.related(word, synset.pos),
                                          prompt):
                out.append(question(rng, prompt, answer, picked, f"{synset.pos}{synset.offset}.{source}"))
    return out


def examples(wordnet: WordNet, distractors: Distractors, rng: random.Random) -> list[dict]:
    """'Fill in the blank: "the ___ barked all night". The missing word is' → dog."""
    out = []
    for synset in wordnet.synsets.values():
        answer = wordnet.head(synset)
        sentence = next((e for e in synset.examples if answer and re.search(rf"\b{answer}\b", e)), None)
        if sentence is None or len(sentence) < 20:
            continue
        blanked = re.sub(rf"\b{answer}\b", "___", sentence, count=1)
        prompt = f'Fill in the blank: "{blanked}". The missing word is'
        if picked := distractors.pick(rng, answer, synset.pos, lower(synset.lemmas), prompt):
            out.append(question(rng, prompt, answer, picked, f"{synset.pos}{synset.offset}"))
    return out


BUILDERS = {"wordnet_definitions": definitions, "wordnet_hypernyms": hypernyms, "wordnet_antonyms": antonyms,
            "wordnet_examples": examples}


def heldout(wordnet: WordNet, used: set[str], n: int = HELDOUT) -> list[dict]:
    """Example sentences (at least 40 characters) of synsets that no question uses, shuffled: {id, source, text}."""
    rows = [{"source": f"{s.pos}{s.offset}", "text": e} for s in wordnet.synsets.values()
            if f"{s.pos}{s.offset}" not in used for e in s.examples if len(e) >= 40]
    random.Random(SEED).shuffle(rows)
    return [{"id": i, **row} for i, row in enumerate(rows[:n])]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make(root: Path, final: Path) -> None:
    """Every task and the held-out text into `root`; the YAMLs point at their data under `final`."""
    deb = artifacts.path("wordnet-base")
    wordnet = WordNet(deb)
    distractors = Distractors(wordnet)
    origin = artifacts.ARTIFACTS["wordnet-base"]
    source = {"artifact": origin.requirement, "file": origin.filename, "sha256": file_sha256(deb), "tasks": {}}
    used = set()
    for name, build in BUILDERS.items():
        docs = [d for d in build(wordnet, distractors, random.Random(f"{SEED}-{name}"))  # no answer in its prompt
                if d["choices"][d["label"]] not in words(d["prompt"])]
        random.Random(SEED).shuffle(docs)
        docs = docs[:QUESTIONS]
        used |= {d["id"].split(".")[0] for d in docs}
        write_jsonl(root / f"{name}.jsonl", docs)
        origin_line = json.dumps(f"{origin.requirement} ({origin.filename}, sha256:{origin.sha256})")
        (root / f"{name}.yaml").write_text(MC_TASK.format(name=name, data=final / f"{name}.jsonl", version=VERSION,
                                                          delimiter=" ") + f"  source: {origin_line}\n")
        source["tasks"][name] = {"documents": len(docs)}
    write_jsonl(root / "heldout.jsonl", heldout(wordnet, used))
    (root / "SOURCE.json").write_text(json.dumps(source, indent=2))


def build() -> Path:
    """The task directory (built once, atomically)."""
    root = Cache.default().wordnet / f"tasks-v{VERSION}"
    return build_once(root, lambda tmp: make(tmp, root), done="SOURCE.json")
