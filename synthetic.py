"""A small synthetic world of Reddit-style advice posts, written in the exact schemas of the real
datasets, so that every stage (pretraining, HellaSwag, TL;DR SFT, reward model, PPO) can be tested
and demoed offline. Nothing here is ever downloaded.

The world: a post is built from slots - who (roommate, sister, landlord, ...), the problem (keeps
eating my food, won't return my security deposit, ...), how long it has gone on, what was tried and
the question asked - rendered through varied sentence templates, with irrelevant distractor sentences.
Each problem belongs to one subreddit and has two "world actions" (what people in this world do about
it: label everything in the fridge, call the city housing inspector, ...). Pretraining prose teaches
those actions; HellaSwag rows test them.

`gold_score(post_text, summary)` is the hidden ground truth of summary quality, computed from text
only (it recovers the post's slots by matching the world's finite vocabulary): covers who / problem /
question (+ duration), no wrong facts, concise, ends with a finished sentence, no copied distractor,
no repetition. It labels the comparisons (with a share of flipped labels, like human raters) and
measures whether RLHF really improves quality. It is meaningful only on posts of this world.

Commands:
    python synthetic.py --out data/synthetic --seed 0                # demo set, a few seconds
    python synthetic.py --preset tiny --out /tmp/syn                 # tiny set (tests)
    python synthetic.py --num-posts 8000 --comparisons-train 8000 --label-noise 0.2

Output layout (OUT = --out):
    OUT/pretrain.jsonl                       {"text"}  posts, advice, stories, how-tos, summary digests
    OUT/pretrain.parquet                     FineWeb-Edu columns: text, id, dump, url, date, file_path,
                                             language, language_score, token_count, score, int_score
    OUT/tldr/{train,valid,test}.jsonl        CarperAI/openai_summarize_tldr: prompt, label
                                             prompt = "SUBREDDIT: r/{sub}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"
                                             label  = the summary, no leading space
    OUT/tldr_raw/{train,valid,test}.jsonl    OpenAI tldr_3_filtered: id, subreddit, title, post, summary
    OUT/comparisons/{train,valid,test}.jsonl CarperAI/openai_summarize_comparisons: prompt, chosen, rejected
                                             prompt = "SUBREDDIT: r/{sub}\\nTITLE: {title}\\nPOST: {post}"
                                             chosen / rejected = "TL;DR: {summary}"
    OUT/comparisons_raw/{train,valid,test}.jsonl  OpenAI comparisons: info{id, post, title, subreddit},
                                             summaries[2]{text (leading space), policy, note=null}, choice,
                                             worker, batch, split ("train", "valid1", "valid2"), extra{confidence}
    OUT/hellaswag/hellaswag_{train,val,test}.jsonl  rowanz/hellaswag: ind, activity_label, ctx_a, ctx_b,
                                             ctx, endings[4], label, split, split_type, source_id
                                             (like the real file, the test split has no label)
    OUT/manifest.json                        sizes, seed, and the label noise actually applied per split

The same seed gives byte-identical files. Pretraining text never uses the SFT prompt template, so SFT
still has something to teach; the pretraining posts are fresh posts, not the TL;DR ones.
"""
from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from common import UserError, atomic_write, cli_main, get_tokenizer, write_text

SPLITS = ("train", "valid", "test")

# -----------------------------------------------------------------------------
# the world's vocabulary. Every slot value is recognised in text by its key phrases, which appear in
# no other slot value, template, distractor or filler (tests check this on every generated post).


@dataclass(frozen=True)
class Who:
    gender: str | None  # "m" / "f", or None: drawn per post
    kind: str           # partner, spouse, family, parent, friend, roommate, work, landlord, neighbor


WHOS = {
    "boyfriend": Who("m", "partner"), "girlfriend": Who("f", "partner"),
    "husband": Who("m", "spouse"), "wife": Who("f", "spouse"),
    "sister": Who("f", "family"), "brother": Who("m", "family"),
    "mom": Who("f", "parent"), "dad": Who("m", "parent"),
    "best friend": Who(None, "friend"), "roommate": Who(None, "roommate"),
    "coworker": Who(None, "work"), "boss": Who(None, "work"),
    "landlord": Who(None, "landlord"), "neighbor": Who(None, "neighbor"),
}


@dataclass(frozen=True)
class Problem:
    subreddit: str
    keys: tuple[str, ...]       # key phrases (first person; matched in any person, see _phrase_regex)
    pres: tuple[str, ...]       # "keeps eating my food" - reads after "My roommate" and after "who"
    ing: str                    # "eating my food without asking" - reads after "has been"
    whos: tuple[str, ...]
    questions: tuple[str, ...]
    actions: tuple[str, ...]    # the world's logic: what people do about it (imperative; " & " joins two verbs)
    activity: str               # HellaSwag activity label


_CLOSE = ("boyfriend", "girlfriend", "husband", "wife", "best friend", "sister", "brother", "mom", "dad")
_PARTNERS = ("boyfriend", "girlfriend", "husband", "wife")
_PERSONAL = ("confront", "boundary", "let_go", "break_up", "divorce", "cut_off")

PROBLEMS = {
    "texts": Problem("relationships", ("my texts",), ("ignores my texts for days", "keeps ignoring my texts for days"),
                     "ignoring my texts", _CLOSE, _PERSONAL,
                     ("ask for a calm phone call to talk things through", "stop reaching out first & wait a few days"),
                     "Ignored messages"),
    "plans": Problem("relationships", ("our plans",), ("cancels our plans at the last minute",
                                                        "keeps canceling our plans at the last minute"),
                     "canceling our plans at the last minute", _CLOSE, _PERSONAL,
                     ("suggest something small that is easy to keep", "make other weekend arrangements with different people"),
                     "Canceled plans"),
    "phone": Problem("relationships", ("my phone",), ("goes through my phone when I'm asleep",
                                                      "keeps going through my phone behind my back"),
                     "going through my phone behind my back", _PARTNERS + ("mom", "dad", "sister"), _PERSONAL,
                     ("put a passcode on the phone", "explain that trust has to go both ways"),
                     "Phone snooping"),
    "mocking": Problem("relationships", ("in front of our friends",), ("makes fun of me in front of our friends",
                                                                        "keeps mocking me in front of our friends"),
                       "making fun of me in front of our friends", _PARTNERS + ("sister", "brother", "best friend"),
                       _PERSONAL, ("speak up privately right after the next joke",
                                   "leave the group hangout early the next time it happens"),
                       "Teasing in public"),
    "chores": Problem("relationships", ("chores",), ("refuses to do any chores", "never helps with the chores"),
                      "refusing to help with the chores", _PARTNERS, ("confront", "boundary", "break_up", "divorce"),
                      ("write a chore chart & split the tasks evenly", "hire a cleaner & split the cost"),
                      "Sharing housework"),
    "food": Problem("roommates", ("my food",), ("keeps eating my food", "eats my food without asking"),
                    "eating my food without asking", ("roommate",), ("confront", "move_out", "let_go", "boundary"),
                    ("label everything in the fridge", "buy a small lockable fridge for the bedroom"),
                    "Stolen food"),
    "music": Problem("roommates", ("music",), ("plays loud music late at night", "keeps blasting music late at night"),
                     "playing loud music late at night", ("roommate",), ("confront", "move_out", "let_go"),
                     ("agree on quiet hours after ten", "buy earplugs and a white noise machine"),
                     "Loud music at night"),
    "dishes": Problem("roommates", ("dishes",), ("leaves dirty dishes in the sink for days", "never washes the dishes"),
                      "leaving dirty dishes in the sink", ("roommate",), ("confront", "move_out", "let_go"),
                      ("set up a cleaning rota for the kitchen", "put the extra plates away until the sink is empty"),
                      "Dirty kitchen"),
    "guests": Problem("roommates", ("people over",), ("brings people over every night without asking",
                                                      "has people over every single night"),
                      "bringing people over every night", ("roommate",), ("confront", "move_out", "boundary"),
                      ("agree on a rule about overnight guests", "ask for a heads up before anyone visits"),
                      "Too many guests"),
    "rent": Problem("roommates", ("the rent",), ("is always late with the rent", "keeps paying the rent late"),
                    "paying the rent late", ("roommate",), ("confront", "move_out", "small_claims"),
                    ("set up automatic transfers before the due date", "put the payment split in writing"),
                    "Late payments"),
    "loan": Problem("personalfinance", ("borrowed money", "money I lent"),
                    ("borrowed money from me and won't pay it back", "won't pay back the money I lent"),
                    "refusing to pay back the money I lent",
                    ("sister", "brother", "best friend", "roommate", "coworker", "mom", "dad"),
                    ("confront", "small_claims", "cut_off", "let_go"),
                    ("write down the amount & ask for a repayment plan", "stop lending anything until it is repaid"),
                    "Unpaid loan"),
    "cosign": Problem("personalfinance", ("co-sign",), ("wants me to co-sign a car loan",
                                                        "keeps pressuring me to co-sign a loan"),
                      "pressuring me to co-sign a loan",
                      ("sister", "brother", "boyfriend", "girlfriend", "best friend", "mom", "dad"),
                      ("say_no", "boundary", "cut_off", "break_up"),
                      ("explain that a co-signer is fully responsible for the debt",
                       "suggest a secured card to build a history instead"),
                      "Co-signing a loan"),
    "card": Problem("personalfinance", ("credit card",), ("used my credit card without asking",
                                                          "keeps using my credit card without asking"),
                    "using my credit card without asking", ("roommate", "boyfriend", "girlfriend", "sister", "brother"),
                    ("confront", "police", "cut_off", "break_up"),
                    ("freeze the card & call the bank", "change the card number & check every statement"),
                    "Card misuse"),
    "deposit": Problem("legaladvice", ("security deposit",), ("won't return my security deposit",
                                                              "is refusing to give back my security deposit"),
                       "refusing to return my security deposit", ("landlord",), ("small_claims", "lawyer", "let_go"),
                       ("send a demand letter & file in small claims court",
                        "photograph the apartment & keep every receipt"),
                       "Deposit dispute"),
    "heating": Problem("legaladvice", ("heating",), ("refuses to fix the broken heating", "still hasn't fixed the heating"),
                       "ignoring the broken heating", ("landlord",), ("move_out", "lawyer"),
                       ("call the city housing inspector", "send repair requests in writing & keep copies"),
                       "Broken heating"),
    "entry": Problem("legaladvice", ("without notice",), ("keeps entering my apartment without notice",
                                                          "comes into my apartment without notice"),
                     "entering my apartment without notice", ("landlord",), ("move_out", "lawyer", "police"),
                     ("change the lock & ask for written warning first", "read the lease & send a formal letter"),
                     "Unannounced visits"),
    "driveway": Problem("legaladvice", ("my driveway",), ("keeps parking in my driveway", "parks in my driveway every day"),
                        "parking in my driveway", ("neighbor",), ("police", "confront", "let_go"),
                        ("call a towing company", "put up a no parking sign"),
                        "Blocked driveway"),
    "fence": Problem("legaladvice", ("fence",), ("built a fence on my side of the property line",
                                                 "put up a fence on my property"),
                     "building a fence on my property", ("neighbor",), ("lawyer", "confront", "let_go"),
                     ("hire a surveyor to measure the lot", "check the city records for the lot lines"),
                     "Property line dispute"),
    "credit": Problem("jobs", ("credit for my work",), ("takes credit for my work", "keeps taking credit for my work"),
                      "taking credit for my work", ("coworker", "boss"), ("report_hr", "confront", "quit"),
                      ("keep a written record of every project", "copy the manager on every update"),
                      "Stolen credit at work"),
    "yelling": Problem("jobs", ("yells at me", "yelling at me"), ("yells at me in meetings", "keeps yelling at me in meetings"),
                       "yelling at me in meetings", ("coworker", "boss"), ("report_hr", "quit", "confront"),
                       ("write down every incident with the date", "ask for a meeting with a manager present"),
                       "Yelling at work"),
    "overtime": Problem("jobs", ("unpaid overtime", "without pay"), ("makes me work unpaid overtime",
                                                                     "keeps asking me to stay late without pay"),
                        "making me work unpaid overtime", ("boss",), ("report_hr", "quit", "lawyer"),
                        ("track every hour worked", "contact the state labor board"),
                        "Unpaid overtime"),
    "schedule": Problem("jobs", ("my schedule", "my shifts"), ("changes my schedule at the last minute",
                                                              "keeps changing my shifts at the last minute"),
                        "changing my schedule at the last minute", ("boss",), ("confront", "quit", "let_go"),
                        ("ask for the roster in writing a week ahead", "request a fixed set of working days"),
                        "Schedule changes"),
}


@dataclass(frozen=True)
class Question:
    keys: tuple[str, ...]
    post: tuple[str, ...]       # as asked in the post ({obj} = him/her)
    summary: tuple[str, ...]    # as a summary asks it
    kinds: tuple[str, ...] | None = None  # who kinds it fits (None: any)


QUESTIONS = {
    "confront": Question(("confront",), ("Should I confront {obj} about it?", "Is it time to confront {obj}?"),
                         ("Should I confront {obj}?", "How do I confront {obj} without a fight?")),
    "boundary": Question(("boundary", "boundaries"), ("How do I set a boundary with {obj}?",
                                                      "How can I set boundaries without hurting {obj}?"),
                         ("How do I set a boundary?", "How do I set boundaries with {obj}?")),
    "let_go": Question(("let it go",), ("Should I just let it go?", "Am I overreacting, or should I let it go?"),
                       ("Should I just let it go?", "Should I let it go?")),
    "break_up": Question(("break up", "breaking up"), ("Should I break up with {obj}?", "Is this a reason to break up?"),
                         ("Should I break up with {obj}?", "Is it time to break up?"), ("partner",)),
    "divorce": Question(("divorce",), ("Is this worth a divorce?", "Should I be thinking about divorce?"),
                        ("Is this grounds for divorce?", "Should I consider divorce?"), ("spouse",)),
    "cut_off": Question(("cut him off", "cut her off", "cutting him off", "cutting her off"),
                        ("Should I cut {obj} off?", "Would it be wrong to cut {obj} off?"),
                        ("Should I cut {obj} off?",), ("family", "parent", "friend")),
    "move_out": Question(("move out", "moving out"), ("Should I just move out?", "Is it time to start planning to move out?"),
                         ("Should I move out?", "Is it time to move out?")),
    "small_claims": Question(("small claims",), ("Is it worth taking {obj} to small claims court?",
                                                 "Can I take {obj} to small claims?"),
                             ("Should I take {obj} to small claims court?", "Is small claims court worth it?")),
    "lawyer": Question(("lawyer",), ("Do I need a lawyer for this?", "Should I talk to a lawyer?"),
                       ("Do I need a lawyer?", "Should I get a lawyer?")),
    "police": Question(("police",), ("Can I call the police about this?", "Should I get the police involved?"),
                       ("Should I call the police?", "Can I call the police?")),
    "report_hr": Question(("HR",), ("Should I report {obj} to HR?", "Is this something to take to HR?"),
                          ("Should I report {obj} to HR?", "Should I go to HR?")),
    "quit": Question(("quit",), ("Should I just quit?", "Is it time to quit this job?"),
                     ("Should I quit?", "Is it time to quit?")),
    "say_no": Question(("say no",), ("How do I say no without ruining everything?", "Is it okay to say no?"),
                       ("How do I say no?", "Is it okay to say no?")),
}

DURATIONS = ("two weeks", "a month", "three months", "six months", "a year", "two years")


@dataclass(frozen=True)
class Tried:
    keys: tuple[str, ...]
    ing: str       # "talking to {obj} about it"
    summary: str   # "I've talked to {obj} about it"


TRIED = {
    "talked": Tried(("talk to him", "talk to her", "talked to him", "talked to her", "talking to him", "talking to her"),
                    "talking to {obj} about it", "I've talked to {obj} about it"),
    "note": Tried(("note",), "leaving a polite note", "I've left a note"),
    "hints": Tried(("hints",), "dropping hints", "I've dropped hints"),
    "ignoring": Tried(("ignoring it",), "ignoring it", "I've tried ignoring it"),
    "email": Tried(("email",), "sending a long email", "I've sent an email"),
    "mediator": Tried(("mediator",), "asking a mediator to help", "I've tried a mediator"),
}
TRIED_BY_SUBREDDIT = {
    "relationships": ("talked", "hints", "ignoring"),
    "roommates": ("talked", "note", "hints", "ignoring"),
    "personalfinance": ("talked", "hints", "ignoring", "email"),
    "legaladvice": ("talked", "note", "email", "mediator"),
    "jobs": ("talked", "email", "ignoring", "mediator"),
}

# irrelevant details: copying one into a summary is penalised by gold_score
DISTRACTORS = (
    "I have a cat named Biscuit who sleeps on the couch all day.",
    "I work evenings at a grocery store downtown.",
    "We live in a small town near the coast.",
    "I just started learning to play the guitar.",
    "It rained the entire weekend, which did not help my mood.",
    "My car is an old blue hatchback that barely starts.",
    "I'm studying for my nursing exams right now.",
    "We both like the same pizza place on the corner.",
    "I recently switched to drinking green tea instead of coffee.",
    "Our building has a tiny garden on the roof.",
    "I have been trying to run three times a week.",
    "I grew up in a house with four dogs.",
    "The weather here has been weirdly warm lately.",
    "I'm a pretty quiet person and I like reading fantasy novels.",
    "I just got back from a trip to see the mountains.",
    "My favorite show just got canceled, which is a whole other story.",
    "I'm also learning to bake bread on the weekends.",
    "Our apartment is on the third floor and the elevator is always broken.",
    "I started a new hobby painting small landscapes.",
    "I drive a long way every morning.",
    "I have a houseplant collection that is slowly taking over.",
    "My job is in accounting, which is mostly spreadsheets.",
    "I volunteer at the animal shelter on Saturdays.",
    "The city just opened a new bike lane on my street.",
    "I'm originally from a small village up north.",
    "I've been trying to drink more water lately.",
    "We adopted a hamster last spring and named it Waffles.",
    "I recently bought a secondhand bike that squeaks.",
    "Last summer I finally learned how to swim properly.",
    "I'm terrible at cooking, so I mostly eat cereal.",
    "The internet in our area goes down every evening.",
    "My laptop is so old that it takes ten minutes to boot.",
)
FEELINGS = (
    "It's really starting to get to me.", "I'm honestly exhausted by all of it.", "I feel like I'm going crazy.",
    "I don't want to be dramatic, but it hurts.", "Some days I just want to scream into a pillow.",
    "I hate conflict, so this is hard for me.",
)
CLOSINGS = ("Thanks in advance.", "Any advice would be appreciated.", "Thanks for reading.")
# filler for rambling summaries: no slot words, long enough to make a summary clearly too long
RAMBLES = (
    "I honestly don't know what to do anymore and it is stressing me out every single day.",
    "It feels like nobody around me understands how exhausting this whole situation has been.",
    "I keep going back and forth in my head about it and I can't sleep well at night.",
    "Maybe I'm overthinking everything, but it has been on my mind constantly and I really needed to vent.",
    "Part of me thinks it's not a big deal, but another part of me is really upset and hurt.",
)
OFF_TOPIC_ACTIONS = (
    "juggle three oranges while humming", "paint the ceiling bright green", "learn to ride a unicycle in the parking lot",
    "knit a tiny sweater for a goldfish", "sing opera to the houseplants", "build a sandcastle in the bathtub",
    "teach a parrot to count backwards", "dye all the socks purple", "climb onto the roof to watch the clouds",
    "bake a cake shaped like a tractor",
)
NAMES = (("Maria", "f"), ("James", "m"), ("Priya", "f"), ("Tom", "m"), ("Aisha", "f"), ("Daniel", "m"),
         ("Sofia", "f"), ("Leo", "m"), ("Emma", "f"), ("Omar", "m"), ("Chloe", "f"), ("Ben", "m"))
WIKIHOW_TOPIC = {"relationships": "Relationships", "roommates": "Home and Garden", "personalfinance": "Finance and Business",
                 "legaladvice": "Home and Garden", "jobs": "Work World"}
PRONOUNS = {"m": {"subj": "he", "obj": "him", "poss": "his"}, "f": {"subj": "she", "obj": "her", "poss": "her"}}

# -----------------------------------------------------------------------------
# text helpers


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_PERSON = {  # first-person words of the problem phrases, rewritten for another person
    "you": {"I'm": "you're", "I": "you", "me": "you", "my": "your", "our": "your"},
    "m": {"I'm": "he's", "I": "he", "me": "him", "my": "his", "our": "their"},
    "f": {"I'm": "she's", "I": "she", "me": "her", "my": "her", "our": "their"},
}


def _person(text: str, person: str) -> str:
    """'keeps eating my food' -> 'keeps eating your food' (person="you") or 'her food' (person="f")."""
    table = _PERSON[person]
    return re.sub(r"\bI'm\b|\bI\b|\bme\b|\bmy\b|\bour\b", lambda m: table[m.group(0)], text)


def _imperative(action: str) -> str:
    """'hire a cleaner & split the cost' -> 'hire a cleaner and split the cost'."""
    return action.replace(" & ", " and ")


def _third_person(action: str) -> str:
    """'hire a cleaner & split the cost' -> 'hires a cleaner and splits the cost' (every verb phrase of
    an action starts with a regular verb)."""
    parts = []
    for phrase in action.split(" & "):
        verb, _, rest = phrase.partition(" ")
        if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
            verb += "es"
        elif verb.endswith("y") and verb[-2] not in "aeiou":
            verb = verb[:-1] + "ies"
        else:
            verb += "s"
        parts.append(f"{verb} {rest}".strip())
    return " and ".join(parts)


def _words(text: str) -> list[str]:
    """Lowercase words, punctuation and possessive 's dropped ("co-sign" and "won't" stay one word)."""
    words = re.findall(r"[a-z0-9$'-]+", text.lower().replace("\u2019", "'"))
    return [w[:-2] if w.endswith("'s") else w for w in words]


SLOT_KINDS = ("who", "problem", "question", "duration", "tried")


# a key phrase in first person also matches in any other person, so that 'eating her food' (HellaSwag,
# stories) is recognised like 'eating my food'
_ANY_PERSON = {"my": ("my", "your", "his", "her", "their"), "me": ("me", "you", "him", "her", "them"),
               "our": ("our", "your", "their"), "i": ("i", "you", "he", "she", "they")}


@lru_cache(maxsize=1)
def _slot_index() -> dict[str, list[tuple[tuple[frozenset, ...], str, str]]]:
    """first word -> [(word alternatives of a key phrase, slot kind, value)]: a word-level matcher, one
    pass over the text, which keeps gold_score cheap enough to run on every PPO rollout."""
    vocab = {"who": {w: (w,) for w in WHOS}, "problem": {k: p.keys for k, p in PROBLEMS.items()},
             "question": {k: q.keys for k, q in QUESTIONS.items()}, "duration": {d: (d,) for d in DURATIONS},
             "tried": {k: t.keys for k, t in TRIED.items()}}
    index: dict[str, list] = {}
    for kind, values in vocab.items():
        for value, keys in values.items():
            for key in keys:
                pattern = tuple(frozenset(_ANY_PERSON.get(w, (w,))) for w in _words(key))
                for first in pattern[0]:
                    index.setdefault(first, []).append((pattern, kind, value))
    return index


@lru_cache(maxsize=8192)
def parse_slots(text: str) -> dict[str, frozenset[str]]:
    """The world's slot values mentioned in a text: {"who": {"roommate"}, "problem": {"food"}, ...}."""
    index, words = _slot_index(), _words(text)
    found = {kind: set() for kind in SLOT_KINDS}
    for i, word in enumerate(words):
        for pattern, kind, value in index.get(word, ()):
            n = len(pattern)
            if i + n <= len(words) and all(words[i + j] in pattern[j] for j in range(1, n)):
                found[kind].add(value)
    return {kind: frozenset(values) for kind, values in found.items()}


@lru_cache(maxsize=1)
def _distractor_ngrams() -> frozenset[tuple[str, ...]]:
    return frozenset(g for d in DISTRACTORS for g in _ngrams(_words(d), 5))


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


# -----------------------------------------------------------------------------
# gold score: the hidden ground truth of summary quality, from text only

COVER_WEIGHTS = {"problem": 0.375, "who": 0.25, "question": 0.25, "duration": 0.125}
COVERAGE_MASS, ENDING_BONUS, CONCISE_BONUS = 0.8, 0.1, 0.1
WRONG_FACT_PENALTY, COPY_PENALTY, REPEAT_PENALTY = 0.35, 0.3, 0.15
MIN_WORDS, MAX_WORDS = 6, 32


def gold_breakdown(post_text: str, summary: str) -> dict:
    """The parts of gold_score. post_text: the post body or the whole prompt (title and subreddit
    included); summary: a candidate summary (a leading space or a trailing <|endoftext|> is fine)."""
    facts = parse_slots(post_text)
    summary = summary.replace("<|endoftext|>", "").strip()
    said = parse_slots(summary)
    present = [k for k in COVER_WEIGHTS if facts[k]]
    covered = [k for k in present if facts[k] & said[k]]
    total = sum(COVER_WEIGHTS[k] for k in present)
    coverage = COVERAGE_MASS * sum(COVER_WEIGHTS[k] for k in covered) / total if total else 0.0
    # a slot value the post does not support is a wrong fact (wrong person, duration, problem, ...)
    wrong = [k for k in SLOT_KINDS if facts[k] and said[k] - facts[k]]
    words = _words(summary)
    ends = len(words) >= 3 and summary[-1:] in (".", "?", "!")
    excess = max(0, len(words) - MAX_WORDS)
    copied = bool(_distractor_ngrams().intersection(_ngrams(words, 5)))
    trigrams = _ngrams(words, 3)
    repeats = len(trigrams) - len(set(trigrams))
    # form earns nothing on its own: a well-formed sentence about nothing in the post is not a summary
    form = ENDING_BONUS * ends + CONCISE_BONUS * (MIN_WORDS <= len(words) <= MAX_WORDS) if covered else 0.0
    score = (coverage + form
             - WRONG_FACT_PENALTY * len(wrong) - min(0.4, 0.02 * excess) - COPY_PENALTY * copied
             - min(0.3, REPEAT_PENALTY * repeats))
    return {"score": min(1.0, max(0.0, score)), "covered": covered, "missing": [k for k in present if k not in covered],
            "wrong": wrong, "words": len(words), "ends": ends, "copied": copied, "repeats": repeats}


def gold_score(post_text: str, summary: str) -> float:
    """Hidden ground-truth quality of `summary` for a post of this world, in [0, 1]."""
    return gold_breakdown(post_text, summary)["score"]


# -----------------------------------------------------------------------------
# posts


@dataclass
class WorldPost:
    id: str
    split: str
    subreddit: str
    title: str
    post: str
    summary: str                  # the reference summary, no leading space
    slots: dict                   # who, gender, problem, duration, tried, question
    distractors: list = field(default_factory=list)  # distractor sentences used in the body

    @property
    def prompt(self) -> str:
        """The CarperAI/openai_summarize_tldr prompt (the SFT template)."""
        return tldr_prompt(self.subreddit, self.title, self.post)


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def comparison_prompt(subreddit: str, title: str, post: str) -> str:
    """CarperAI/openai_summarize_comparisons prompt: the same without the trailing TL;DR line."""
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}"


def sample_slots(rng: random.Random, problem_key: str | None = None) -> dict:
    """Random slots of one post (of the given problem, if any), consistent with each other."""
    problem_key = problem_key or rng.choice(sorted(PROBLEMS))
    problem = PROBLEMS[problem_key]
    who = rng.choice(problem.whos)
    questions = [q for q in problem.questions if QUESTIONS[q].kinds is None or WHOS[who].kind in QUESTIONS[q].kinds]
    return {"who": who, "gender": WHOS[who].gender or rng.choice("mf"), "problem": problem_key,
            "duration": rng.choice(DURATIONS), "tried": rng.choice(TRIED_BY_SUBREDDIT[problem.subreddit]),
            "question": rng.choice(questions)}


def _age_tag(rng: random.Random, gender: str, who: str | None = None) -> str:
    if rng.random() < 0.5:
        return ""
    lo, hi = (45, 70) if who in ("mom", "dad") else (19, 40)
    return f" ({rng.randint(lo, hi)}{gender.upper()})"


def render_post(rng: random.Random, slots: dict, post_id: str = "t3_0", split: str = "train") -> WorldPost:
    """A post (title, body, reference summary) for the given slots, through randomly chosen templates."""
    problem = PROBLEMS[slots["problem"]]
    who, pron = slots["who"], PRONOUNS[slots["gender"]]
    pres = rng.choice(problem.pres)
    me = rng.choice("mf")
    tag = _age_tag(rng, slots["gender"], who)
    intro = rng.choice((
        f"My {who}{tag} {pres}.",
        f"I ({rng.randint(19, 40)}{me.upper()}) need advice about my {who}{tag}, who {pres}.",
        f"So my {who}{tag} {pres}, and I don't know how to handle it.",
        f"Throwaway account. My {who}{tag} {pres}.",
        f"Long time lurker, first post. My {who} {pres}.",
    ))
    d = slots["duration"]
    duration = rng.choice((f"This has been going on for {d}.", f"It started about {d} ago.",
                           f"It's been like this for {d} now.", f"For the last {d} it has only gotten worse."))
    t = TRIED[slots["tried"]].ing.format(**pron)
    tried = rng.choice((f"I tried {t}, but nothing changed.", f"I've already tried {t}.", f"{_cap(t)} didn't help at all.",
                        f"I started by {t}, but {pron['subj']} just shrugged it off."))
    distractors = rng.sample(DISTRACTORS, rng.randint(1, 4))
    middle = [duration, tried, *distractors, *rng.sample(FEELINGS, rng.randint(0, 2))]
    rng.shuffle(middle)
    question = rng.choice(QUESTIONS[slots["question"]].post).format(**pron)
    sentences = [intro, *middle, question] + ([rng.choice(CLOSINGS)] if rng.random() < 0.4 else [])
    # two or three paragraphs, like real posts
    cuts = sorted(rng.sample(range(1, len(sentences)), rng.randint(1, 2)))
    paragraphs = [" ".join(sentences[a:b]) for a, b in zip([0, *cuts], [*cuts, len(sentences)])]
    title = rng.choice((f"My {who} {pres}", f"Need advice about my {who}", f"{_cap(who)} problems, what should I do?",
                        f"How do I handle this with my {who}?", "Not sure what to do anymore", "Is this normal?"))
    summary = reference_summary(rng, slots)
    return WorldPost(id=post_id, split=split, subreddit=problem.subreddit, title=title, post="\n\n".join(paragraphs),
                summary=summary, slots=dict(slots), distractors=distractors)


SUMMARY_TEMPLATES = (
    "My {who} {pres}. {q}",
    "My {who} has been {ing} for {d}. {q}",
    "My {who} {pres} and {tried}. {q}",
    "My {who} has been {ing} for {d}, and {tried}. {q}",
    "For {d}, my {who} has been {ing}. {q}",
)


def _summary_fields(rng: random.Random, slots: dict) -> dict:
    pron = PRONOUNS[slots["gender"]]
    problem = PROBLEMS[slots["problem"]]
    return {"who": slots["who"], "pres": rng.choice(problem.pres), "ing": problem.ing, "d": slots["duration"],
            "tried": TRIED[slots["tried"]].summary.format(**pron),
            "q": rng.choice(QUESTIONS[slots["question"]].summary).format(**pron)}


def reference_summary(rng: random.Random, slots: dict, exclude: str | None = None) -> str:
    """A good summary: who + problem + question, sometimes duration or what was tried."""
    for _ in range(20):
        text = rng.choice(SUMMARY_TEMPLATES).format(**_summary_fields(rng, slots))
        if text != exclude:
            return text
    return text


def make_world(seed: int = 0, num_posts: int = 4000, valid_frac: float = 0.1, test_frac: float = 0.1) -> dict[str, list[WorldPost]]:
    """{"train": [...], "valid": [...], "test": [...]} posts; splits never share a post."""
    sizes = split_sizes(num_posts, valid_frac, test_frac)
    rng = random.Random(f"{seed}:posts")
    world, used = {}, set()
    for split in SPLITS:
        posts = []
        for _ in range(sizes[split]):
            post_id = _reddit_id(rng, used)
            posts.append(render_post(rng, sample_slots(rng), post_id, split))
        world[split] = posts
    return world


def split_sizes(num_posts: int, valid_frac: float, test_frac: float) -> dict[str, int]:
    if not (0 <= valid_frac < 1 and 0 <= test_frac < 1):
        raise UserError(f"valid/test fractions must be in [0, 1), got {valid_frac} and {test_frac}")
    n_valid, n_test = round(num_posts * valid_frac), round(num_posts * test_frac)
    sizes = {"train": num_posts - n_valid - n_test, "valid": n_valid, "test": n_test}
    if min(sizes.values()) < 1:
        raise UserError(f"--num-posts {num_posts} with valid/test fractions {valid_frac}/{test_frac} leaves an empty "
                        f"split ({sizes}); use more posts")
    return sizes


def _reddit_id(rng: random.Random, used: set) -> str:
    while True:
        n, digits = rng.randrange(36 ** 5, 36 ** 6), ""
        while n:
            n, r = divmod(n, 36)
            digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        if digits not in used:
            used.add(digits)
            return f"t3_{digits}"


# -----------------------------------------------------------------------------
# degraded summaries and comparisons

DEGRADATIONS = ("missing", "wrong", "long", "copy", "truncated")
CANDIDATE_KINDS = ("ref", "good") + DEGRADATIONS


def summary_variant(post: WorldPost, kind: str, rng: random.Random) -> str:
    """A candidate summary of `post`: "ref" (the reference), "good" (a mildly different good one), or a
    degraded one - "missing" (a key slot left out), "wrong" (a slot contradicts the post), "long"
    (rambling), "copy" (a distractor sentence copied from the post), "truncated" (cut mid-sentence)."""
    slots = post.slots
    if kind == "ref":
        return post.summary
    if kind == "good":
        return reference_summary(rng, slots, exclude=post.summary)
    f = _summary_fields(rng, slots)
    if kind == "missing":
        return rng.choice((
            f"Someone close to me {f['pres']}. {f['q']}",          # no who
            f"My {f['who']} is driving me crazy. {f['q']}",        # no problem
            f"Things with my {f['who']} keep getting worse. {f['q']}",
            f"My {f['who']} {f['pres']} and {f['tried']}.",         # no question
            f"My {f['who']} has been {f['ing']} for {f['d']}.",
        ))
    if kind == "wrong":
        wrong = dict(slots)
        slot = rng.choice(("who", "problem", "duration", "question", "tried"))
        if slot == "who":
            wrong["who"] = rng.choice([w for w in WHOS if w != slots["who"]])
        elif slot == "problem":
            wrong["problem"] = rng.choice([p for p in PROBLEMS if p != slots["problem"]])
        elif slot == "duration":
            wrong["duration"] = rng.choice([d for d in DURATIONS if d != slots["duration"]])
        elif slot == "question":
            wrong["question"] = rng.choice([q for q in QUESTIONS if q != slots["question"]])
        else:
            wrong["tried"] = rng.choice([t for t in TRIED if t != slots["tried"]])
        g = _summary_fields(rng, wrong)
        # a template that states the changed slot
        template = {"duration": "My {who} has been {ing} for {d}. {q}", "tried": "My {who} {pres} and {tried}. {q}"}
        return template.get(slot, rng.choice(SUMMARY_TEMPLATES)).format(**g)
    if kind == "long":
        ref = post.summary
        body, _, question = ref.rpartition(". ")
        filler = " ".join(rng.sample(RAMBLES, 3))
        return f"{body}. {filler} {question}" if body else f"{ref} {filler}"
    if kind == "copy":
        body, _, question = post.summary.rpartition(". ")
        return f"{body}. {rng.choice(post.distractors)} {question}"
    if kind == "truncated":
        words = post.summary.split()
        cut = rng.randint(max(5, (len(words) * 2) // 5), max(5, len(words) - 2))
        return " ".join(words[:cut]).rstrip(".,?!")
    raise ValueError(f"unknown summary variant {kind!r}")


@dataclass
class WorldComparison:
    post: WorldPost
    chosen: str               # no leading space
    rejected: str
    chosen_kind: str
    rejected_kind: str
    chosen_score: float       # gold scores
    rejected_score: float
    flipped: bool             # True: a noisy label, the rater preferred the worse summary


def make_comparisons(posts: list[WorldPost], num: int, seed: int = 0, label_noise: float = 0.1,
                     split: str = "train") -> list[WorldComparison]:
    """`num` preference pairs over `posts`: two candidates of different quality, the better by gold_score
    is chosen, except that each label is flipped with probability `label_noise` (`.flipped` says which)."""
    rng = random.Random(f"{seed}:comparisons:{split}")
    weights = {"ref": 2, "good": 2, "missing": 1.5, "wrong": 1.5, "long": 1, "copy": 1, "truncated": 1}
    kinds, w = list(weights), list(weights.values())
    pairs = []
    while len(pairs) < num:
        post = rng.choice(posts)
        a, b = rng.choices(kinds, w, k=2)
        ta, tb = summary_variant(post, a, rng), summary_variant(post, b, rng)
        rated = rate_pair(post.prompt, ta, tb, rng, label_noise)
        if rated is None:
            continue
        a_chosen, sa, sb, flipped = rated
        if not a_chosen:
            a, b, ta, tb, sa, sb = b, a, tb, ta, sb, sa
        pairs.append(WorldComparison(post, ta, tb, a, b, sa, sb, flipped))
    return pairs


MIN_GOLD_GAP = 0.05  # the rater labels a pair only when gold picks a clear winner: no ties


def rate_pair(post_text: str, a: str, b: str, rng: random.Random,
              label_noise: float) -> tuple[bool, float, float, bool] | None:
    """The world's rater on two summaries of one post: None when they are the same text or their gold
    scores are closer than MIN_GOLD_GAP, else (a_chosen, gold_a, gold_b, flipped): the summary with the
    higher gold score is chosen, except that the label is flipped with probability label_noise."""
    sa, sb = gold_score(post_text, a), gold_score(post_text, b)
    if a == b or abs(sa - sb) < MIN_GOLD_GAP:
        return None
    flipped = rng.random() < label_noise
    return (sa > sb) != flipped, sa, sb, flipped


def rate_samples(post_text: str, samples: list[str], rng: random.Random, label_noise: float,
                 max_pairs: int) -> list[tuple[str, str, bool]]:
    """Up to max_pairs labelled pairs (chosen, rejected, flipped) among a post's sampled summaries: the
    distinct non-empty samples are paired every way, pairs rate_pair leaves unlabelled are dropped, and
    max_pairs of the rest are drawn at random."""
    samples = [s for s in dict.fromkeys(samples) if s.strip()]
    pairs = [(a, b) for i, a in enumerate(samples) for b in samples[i + 1:]]
    rng.shuffle(pairs)
    out = []
    for a, b in pairs:
        if len(out) == max_pairs:
            break
        rated = rate_pair(post_text, a, b, rng, label_noise)
        if rated is not None:
            a_chosen, _, _, flipped = rated
            out.append((a, b, flipped) if a_chosen else (b, a, flipped))
    return out


# -----------------------------------------------------------------------------
# HellaSwag: one ending follows the world's logic, three contradict it or are off topic

HELLASWAG_SPLITS = ("train", "val", "test")


def zeroshot_problems(seed: int) -> frozenset[str]:
    """Problems kept out of hellaswag_train (split_type "zeroshot" in val/test)."""
    keys = sorted(PROBLEMS)
    return frozenset(random.Random(f"{seed}:zeroshot").sample(keys, len(keys) // 5))


def make_hellaswag(seed: int = 0, num: int = 1000, split: str = "val") -> list[dict]:
    """Rows of hellaswag_{split}.jsonl (the test split, like the real one, has no label)."""
    rng = random.Random(f"{seed}:hellaswag:{split}")
    zeroshot = zeroshot_problems(seed)
    indomain = [p for p in sorted(PROBLEMS) if p not in zeroshot]
    offset = {"train": 0, "val": 100_000, "test": 200_000}[split]
    rows = []
    for i in range(num):
        is_zeroshot = split != "train" and rng.random() < 0.25
        key = rng.choice(sorted(zeroshot) if is_zeroshot else indomain)
        problem = PROBLEMS[key]
        correct = rng.choice(problem.actions)
        # train rows never mention a held-out problem's actions, not even as wrong endings: zero-shot
        # rows then test what pretraining taught, not what the train split taught to avoid
        known = {k: p for k, p in sorted(PROBLEMS.items()) if split != "train" or k not in zeroshot}
        same_sub = [a for k, p in known.items() if k != key and p.subreddit == problem.subreddit for a in p.actions]
        other_sub = [a for k, p in known.items() if p.subreddit != problem.subreddit for a in p.actions]
        wrong = [rng.choice(same_sub or other_sub), rng.choice(other_sub), rng.choice(OFF_TOPIC_ACTIONS)]
        slots = sample_slots(rng, key)
        if rng.random() < 0.7:
            row = _activitynet_row(rng, problem, slots, correct, wrong)
        else:
            row = _wikihow_row(rng, problem, slots, correct, wrong)
        row.update(ind=offset + i, split=split, split_type="zeroshot" if is_zeroshot else "indomain")
        if split == "test":
            del row["label"]
        rows.append(row)
    return rows


def _activitynet_row(rng, problem: Problem, slots: dict, correct: str, wrong: list[str]) -> dict:
    name, g = rng.choice(NAMES)
    who, wp = slots["who"], PRONOUNS[slots["gender"]]
    pres, ing = _person(rng.choice(problem.pres), g), _person(problem.ing, g)
    subj = PRONOUNS[g]["subj"]
    ctx_a, ctx_b = rng.choice((
        (f"{name}'s {who} {pres}.", subj),
        (f"{name}'s {who} has been {ing} for {slots['duration']}.", subj),
        (f"{name} tried {TRIED[slots['tried']].ing.format(**wp)}, but {PRONOUNS[g]['poss']} {who} kept {ing}.",
         f"in the end, {subj}"),
    ))
    endings = [_third_person(a) + "." for a in [correct, *wrong]]
    order = rng.sample(range(4), 4)
    return {"activity_label": problem.activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
            "endings": [endings[j] for j in order], "label": order.index(0),
            "source_id": "activitynet~v_" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
                                                    for _ in range(11))}


def _wikihow_row(rng, problem: Problem, slots: dict, correct: str, wrong: list[str]) -> dict:
    ctx_a = (f"[header] How to deal with a {slots['who']} who {_person(rng.choice(problem.pres), 'you')} "
             f"[title] Stay calm before you act. [step] Take a few deep breaths and think about what you want.")
    endings = [f"[title] {_cap(_imperative(a))}. [step] This is the usual advice for this situation."
               for a in [correct, *wrong]]
    order = rng.sample(range(4), 4)
    return {"activity_label": WIKIHOW_TOPIC[problem.subreddit], "ctx_a": ctx_a, "ctx_b": "", "ctx": ctx_a,
            "endings": [endings[j] for j in order], "label": order.index(0),
            "source_id": f"wikihow~{rng.randint(1, 120_000)}"}


def action_problem(ending: str) -> str | None:
    """The problem whose world action an ending states (None: off topic)."""
    for key, problem in PROBLEMS.items():
        for action in problem.actions:
            if _imperative(action) in ending.lower() or _third_person(action) in ending.lower():
                return key
    return None


# -----------------------------------------------------------------------------
# pretraining documents: posts (never in the SFT template), advice, stories, how-tos, summary digests

_ADVICE_LEADS = ("the usual advice is to", "most people would", "the first step is to", "a good move is to",
                 "people in this situation usually")


def make_pretrain_docs(seed: int = 0, num: int = 10000) -> list[str]:
    """Plain-text documents about the world. Posts here are fresh ones, not the TL;DR posts."""
    rng = random.Random(f"{seed}:pretrain")
    kinds = {"post": 0.35, "advice": 0.2, "story": 0.2, "howto": 0.15, "digest": 0.1}
    docs = []
    for _ in range(num):
        kind = rng.choices(list(kinds), list(kinds.values()))[0]
        docs.append(getattr(_Docs, kind)(rng))
    return docs


class _Docs:
    @staticmethod
    def post(rng) -> str:
        post = render_post(rng, sample_slots(rng))
        text = f"{post.title}\n\n{post.post}"
        if rng.random() < 0.5:
            a, b = PROBLEMS[post.slots["problem"]].actions
            text += f"\n\nTop reply: You should {_imperative(a)}. If that doesn't work, {_imperative(b)}."
        return text

    @staticmethod
    def advice(rng) -> str:
        paragraphs = []
        for _ in range(rng.randint(1, 3)):
            slots = sample_slots(rng)
            problem = PROBLEMS[slots["problem"]]
            a, b = rng.sample(problem.actions, 2)
            paragraphs.append(f"If your {slots['who']} {_person(rng.choice(problem.pres), 'you')}, "
                              f"{rng.choice(_ADVICE_LEADS)} {_imperative(a)}. You can also {_imperative(b)}. "
                              f"People in r/{problem.subreddit} give this advice all the time.")
        return "\n\n".join(paragraphs)

    @staticmethod
    def story(rng) -> str:
        slots = sample_slots(rng)
        problem = PROBLEMS[slots["problem"]]
        name, g = rng.choice(NAMES)
        p, wp = PRONOUNS[g], PRONOUNS[slots["gender"]]
        a, b = rng.sample(problem.actions, 2)
        pres = _person(rng.choice(problem.pres), g)
        if rng.random() < 0.3:  # the short form of HellaSwag's contexts
            return f"{name}'s {slots['who']} {pres}. {_cap(p['subj'])} {_third_person(a)}."
        return (f"{name}'s {slots['who']} {pres}. This went on for {slots['duration']}. "
                f"{_cap(p['subj'])} tried {TRIED[slots['tried']].ing.format(**wp)}, but nothing changed. "
                f"In the end, {p['subj']} {_third_person(a)}. {_cap(p['subj'])} also {_third_person(b)}. "
                + rng.choice(("After that, things got a lot better.", "It was awkward at first, but it worked.",
                              "It took a while, but the situation improved.")))

    @staticmethod
    def howto(rng) -> str:
        slots = sample_slots(rng)
        problem = PROBLEMS[slots["problem"]]
        a, b = rng.sample(problem.actions, 2)
        return (f"How to deal with a {slots['who']} who {_person(rng.choice(problem.pres), 'you')}\n\n"
                f"Stay calm before you act. Take a few deep breaths and think about what you want. "
                f"Then {_imperative(a)}. You can also {_imperative(b)}. This is the usual advice for this situation.")

    @staticmethod
    def digest(rng) -> str:
        lines = [reference_summary(rng, sample_slots(rng)) for _ in range(rng.randint(3, 5))]
        return "Some of the questions people asked this week:\n" + "\n".join(f"- {s}" for s in lines)


FINEWEB_COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count",
                   "score", "int_score")


def fineweb_rows(docs: list[str], seed: int = 0) -> list[dict]:
    """The documents with FineWeb-Edu's metadata columns (plausible values, real token counts)."""
    rng = random.Random(f"{seed}:fineweb")
    counts = [len(ids) for ids in get_tokenizer().encode_ordinary_batch(docs, num_threads=1)]
    rows = []
    for i, (text, count) in enumerate(zip(docs, counts)):
        dump = rng.choice(("CC-MAIN-2023-50", "CC-MAIN-2024-10", "CC-MAIN-2024-18"))
        score = round(rng.uniform(2.6, 4.4), 6)
        rows.append({
            "text": text, "id": f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>", "dump": dump,
            "url": f"https://{rng.choice(('advicecorner', 'homehelp', 'moneytalk', 'workplace-notes'))}.example.org/post/{i}",
            "date": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
                    f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
            "file_path": f"s3://commoncrawl/crawl-data/{dump}/segments/1700000000000.{rng.randint(0, 99)}/warc/"
                         f"{dump}-{rng.randint(0, 99999):05d}.warc.gz",
            "language": "en", "language_score": round(rng.uniform(0.9, 0.999), 6), "token_count": count,
            "score": score, "int_score": int(round(score)),
        })
    return rows


# -----------------------------------------------------------------------------
# writers


def tldr_row(post: WorldPost) -> dict:
    return {"prompt": post.prompt, "label": post.summary}


def tldr_raw_row(post: WorldPost) -> dict:
    return {"id": post.id, "subreddit": post.subreddit, "title": post.title, "post": post.post, "summary": post.summary}


def comparison_row(c: WorldComparison) -> dict:
    p = c.post
    return {"prompt": comparison_prompt(p.subreddit, p.title, p.post), "chosen": f"TL;DR: {c.chosen}",
            "rejected": f"TL;DR: {c.rejected}"}


_RAW_SPLIT = {"train": "train", "valid": "valid1", "test": "valid2"}  # OpenAI's names; valid2 was held out
_POLICY = {"ref": "ref", "good": "sup_good", "missing": "sup_missing", "wrong": "sup_wrong", "long": "sup_long",
           "copy": "sup_copy", "truncated": "sup_truncated"}


def comparison_raw_row(c: WorldComparison, rng: random.Random) -> dict:
    p = c.post
    chosen = {"text": f" {c.chosen}", "policy": _POLICY[c.chosen_kind], "note": None}
    rejected = {"text": f" {c.rejected}", "policy": _POLICY[c.rejected_kind], "note": None}
    choice = rng.randrange(2)
    summaries = [chosen, rejected] if choice == 0 else [rejected, chosen]
    batch = {"train": f"batch{rng.randint(3, 10)}", "valid": "batch11", "test": "batch12"}[p.split]
    return {"info": {"id": p.id, "post": p.post, "title": p.title, "subreddit": p.subreddit}, "summaries": summaries,
            "choice": choice, "worker": f"synthetic-worker-{rng.randint(1, 24):02d}", "batch": batch,
            "split": _RAW_SPLIT[p.split], "extra": {"confidence": rng.randint(1, 9)}}


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    atomic_write(path, lambda f: f.write(data), "wb")
    return Path(path)


def write_parquet(path: str | Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    types = {"language_score": pa.float64(), "score": pa.float64(), "token_count": pa.int64(), "int_score": pa.int64()}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in FINEWEB_COLUMNS])
    table = pa.Table.from_pylist(rows, schema=schema)
    # fixed settings: same rows -> same bytes
    atomic_write(path, lambda f: pq.write_table(table, f, compression="snappy", row_group_size=100_000))
    return Path(path)


def write_all(out_dir: str | Path, seed: int = 0, num_posts: int = 4000, valid_frac: float = 0.1,
              test_frac: float = 0.1, pretrain_docs: int = 10000, comparisons_train: int = 4000,
              comparisons_valid: int = 500, comparisons_test: int = 500, hellaswag_train: int = 1000,
              hellaswag_val: int = 1000, hellaswag_test: int = 500, label_noise: float = 0.1) -> dict[str, Path]:
    """Write every file of the layout (module docstring) under out_dir; returns {name: path}, e.g.
    paths["tldr/train"], paths["comparisons_raw/valid"], paths["hellaswag/val"], paths["pretrain_parquet"]."""
    sizes = {"pretrain_docs": pretrain_docs, "comparisons_train": comparisons_train,
             "comparisons_valid": comparisons_valid, "comparisons_test": comparisons_test,
             "hellaswag_train": hellaswag_train, "hellaswag_val": hellaswag_val, "hellaswag_test": hellaswag_test}
    for name, n in sizes.items():
        if n < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {n}")
    if not 0 <= label_noise <= 1:
        raise UserError(f"--label-noise must be in [0, 1], got {label_noise}")
    out = Path(out_dir)
    world = make_world(seed, num_posts, valid_frac, test_frac)
    paths: dict[str, Path] = {}

    docs = make_pretrain_docs(seed, pretrain_docs)
    paths["pretrain_jsonl"] = write_jsonl(out / "pretrain.jsonl", [{"text": d} for d in docs])
    paths["pretrain_parquet"] = write_parquet(out / "pretrain.parquet", fineweb_rows(docs, seed))

    n_comparisons = {"train": comparisons_train, "valid": comparisons_valid, "test": comparisons_test}
    applied = {}
    for split in SPLITS:
        posts = world[split]
        paths[f"tldr/{split}"] = write_jsonl(out / "tldr" / f"{split}.jsonl", [tldr_row(p) for p in posts])
        paths[f"tldr_raw/{split}"] = write_jsonl(out / "tldr_raw" / f"{split}.jsonl", [tldr_raw_row(p) for p in posts])
        pairs = make_comparisons(posts, n_comparisons[split], seed, label_noise, split)
        paths[f"comparisons/{split}"] = write_jsonl(out / "comparisons" / f"{split}.jsonl",
                                                    [comparison_row(c) for c in pairs])
        rng = random.Random(f"{seed}:raw:{split}")
        paths[f"comparisons_raw/{split}"] = write_jsonl(out / "comparisons_raw" / f"{split}.jsonl",
                                                        [comparison_raw_row(c, rng) for c in pairs])
        flipped = sum(c.flipped for c in pairs)
        applied[split] = {"pairs": len(pairs), "flipped": flipped, "rate": flipped / len(pairs)}

    n_hellaswag = {"train": hellaswag_train, "val": hellaswag_val, "test": hellaswag_test}
    for split in HELLASWAG_SPLITS:
        paths[f"hellaswag/{split}"] = write_jsonl(out / "hellaswag" / f"hellaswag_{split}.jsonl",
                                                  make_hellaswag(seed, n_hellaswag[split], split))

    manifest = {"seed": seed, "posts": {s: len(world[s]) for s in SPLITS}, "label_noise": label_noise,
                "label_noise_applied": applied, "zeroshot_problems": sorted(zeroshot_problems(seed)), **sizes}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_text(out / "manifest.json", text)
    paths["manifest"] = out / "manifest.json"
    return paths


# -----------------------------------------------------------------------------
# CLI


@dataclass
class Config:
    out: str = "data/synthetic"     # output folder (layout in the module docstring)
    seed: int = 0                   # same seed -> byte-identical files
    num_posts: int = 4000           # TL;DR posts over train/valid/test
    valid_frac: float = 0.1         # share of posts in the valid split
    test_frac: float = 0.1          # share of posts in the test split
    pretrain_docs: int = 10000      # pretraining documents (pretrain.jsonl / pretrain.parquet)
    comparisons_train: int = 4000   # preference pairs in comparisons/train
    comparisons_valid: int = 500    # preference pairs in comparisons/valid
    comparisons_test: int = 500     # preference pairs in comparisons/test
    hellaswag_train: int = 1000     # rows in hellaswag_train.jsonl
    hellaswag_val: int = 1000       # rows in hellaswag_val.jsonl
    hellaswag_test: int = 500       # rows in hellaswag_test.jsonl (unlabeled, like the real one)
    label_noise: float = 0.1        # share of comparison labels flipped, like noisy human raters


PRESETS = {
    "tiny": {"num_posts": 60, "pretrain_docs": 100, "comparisons_train": 60, "comparisons_valid": 20,
             "comparisons_test": 20, "hellaswag_train": 40, "hellaswag_val": 40, "hellaswag_test": 20},
    "demo": {},
}


def main(cfg: Config) -> dict[str, Path]:
    fields = asdict(cfg)
    out = fields.pop("out")
    paths = write_all(out, **fields)
    manifest = json.loads(paths["manifest"].read_text())
    noise = ", ".join(f"{s} {v['rate']:.3f}" for s, v in manifest["label_noise_applied"].items())
    print(f"wrote {len(paths)} files to {out}: posts {manifest['posts']}, {cfg.pretrain_docs} pretraining docs, "
          f"label noise applied: {noise}")
    return paths


if __name__ == "__main__":
    cli_main(main, Config, PRESETS)
