"""An embedded story corpus whose true distribution is known exactly.

Stories are drawn from a small probabilistic grammar written for this engine: a
character (a name, which fixes the pronoun, and a kind), a place, a goal, an event, an
optional line of dialogue, an outcome that depends on the goal, and an ending. Every
choice has a known probability (Zipf-like, so there is a long tail for collapse to
lose), and each slot's options are distinct strings in fixed positions, so a story's
text determines its choices: log p(text) is the sum of the log-probabilities of its
choices, exactly. That makes the model's excess cross-entropy over the truth —
its KL divergence to the true distribution — measurable every generation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAMES = [("Lily", "she"), ("Tom", "he"), ("Mia", "she"), ("Ben", "he"), ("Sue", "she"),
         ("Max", "he"), ("Anna", "she"), ("Sam", "he"), ("Lucy", "she"), ("Tim", "he"),
         ("Zoe", "she"), ("Jack", "he"), ("Ella", "she"), ("Leo", "he"), ("Rosa", "she"),
         ("Finn", "he"), ("Ivy", "she"), ("Otto", "he"), ("Nora", "she"), ("Hugo", "he"),
         ("Pia", "she"), ("Cal", "he"), ("Wren", "she"), ("Abe", "he")]
ADJECTIVES = ["little", "happy", "brave", "shy", "curious", "kind", "silly", "small",
              "clever", "sleepy", "gentle", "proud"]
KINDS = ["girl", "boy", "bunny", "puppy", "kitten", "bear", "bird", "fox", "duck", "frog",
         "mouse", "owl"]
PLACES = ["in a small house", "near a big forest", "by the sea", "on a farm",
          "in a busy town", "under a tall tree", "next to a quiet pond", "in a sunny garden",
          "on a green hill", "near an old bridge", "in a warm cave", "by a little river"]
GOALS = [  # (goal, [outcomes that can follow it])
    ("find a shiny rock", ["found the shiny rock under a leaf",
                           "found a rock that was even shinier",
                           "did not find the rock, but found a new friend"]),
    ("fly a red kite", ["made the kite fly high in the sky",
                        "saw the kite get stuck in a tree, and a bird helped",
                        "learned to run fast with the kite"]),
    ("bake a big cake", ["baked a cake and shared it with everyone",
                         "made a mess, and then a very good cake",
                         "baked a small cake that tasted sweet"]),
    ("climb the tall hill", ["climbed to the top and saw the whole town",
                             "got tired, rested, and then reached the top",
                             "climbed the hill with a friend"]),
    ("make a new friend", ["made a friend who liked to play",
                           "met a friend who was shy too",
                           "found a friend at the park"]),
    ("plant a flower", ["planted a flower that grew very tall",
                        "watered the flower every day until it bloomed",
                        "planted many flowers in a row"]),
    ("build a sand castle", ["built a castle with a tall tower",
                             "built a castle, and the waves came to see it",
                             "built a castle with a little door"]),
    ("find a lost ball", ["found the ball behind a bush",
                          "found the ball in the water",
                          "found the ball and gave it back"]),
    ("sing a loud song", ["sang a song that made everyone smile",
                          "sang so loud that the birds sang too",
                          "sang a quiet song instead"]),
    ("help an old dog", ["helped the dog find its way home",
                         "gave the dog some water and a hug",
                         "walked with the dog to the park"]),
]
EVENTS = ["it started to rain", "a strong wind came", "a friend came to visit",
          "the sun was very bright", "a big box was at the door", "a loud noise was heard",
          "the sky turned pink", "a little bird sang", "mom called from the house",
          "a cat ran past", "the lights went out", "a rainbow came out"]
DIALOGUE = [None, "I can do it", "Let us try again", "This is fun", "Please help me",
            "I am not scared", "Look at that", "We can share", "Thank you"]
ENDINGS = ["was very happy", "smiled all day", "went to sleep with a big smile",
           "could not wait for tomorrow", "said it was the best day ever"]


def _zipf(n: int, s: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


P_NAME, P_ADJ, P_KIND = _zipf(len(NAMES)), _zipf(len(ADJECTIVES)), _zipf(len(KINDS))
P_PLACE, P_GOAL, P_EVENT = _zipf(len(PLACES)), _zipf(len(GOALS)), _zipf(len(EVENTS))
P_DIALOGUE = np.concatenate([[0.3], 0.7 * _zipf(len(DIALOGUE) - 1)])
P_OUTCOME = np.array([0.6, 0.25, 0.15])
P_ENDING = _zipf(len(ENDINGS))


@dataclass(frozen=True)
class Story:
    text: str
    logprob: float  # natural log of the story's exact probability under the grammar


def render(name: int, adj: int, kind: int, place: int, goal: int, event: int,
           dialogue: int, outcome: int, ending: int) -> str:
    who, pronoun = NAMES[name]
    article = "an" if ADJECTIVES[adj][0] in "aeiou" else "a"
    goal_text, outcomes = GOALS[goal]
    lines = [f"Once upon a time, there was {article} {ADJECTIVES[adj]} {KINDS[kind]} named {who}.",
             f"{pronoun.capitalize()} lived {PLACES[place]}.",
             f"{who} wanted to {goal_text}.",
             f"One day, {EVENTS[event]}."]
    if DIALOGUE[dialogue] is not None:
        lines.append(f'"{DIALOGUE[dialogue]}!" said {who}.')
    lines.append(f"In the end, {who} {outcomes[outcome]}.")
    lines.append(f"{who} {ENDINGS[ending]}.")
    return " ".join(lines)


def sample_stories(n: int, seed: int) -> list[Story]:
    """n stories drawn i.i.d. from the grammar, with their exact log-probabilities."""
    rng = np.random.default_rng(seed)
    choices = {
        "name": (P_NAME, rng.choice(len(P_NAME), n, p=P_NAME)),
        "adj": (P_ADJ, rng.choice(len(P_ADJ), n, p=P_ADJ)),
        "kind": (P_KIND, rng.choice(len(P_KIND), n, p=P_KIND)),
        "place": (P_PLACE, rng.choice(len(P_PLACE), n, p=P_PLACE)),
        "goal": (P_GOAL, rng.choice(len(P_GOAL), n, p=P_GOAL)),
        "event": (P_EVENT, rng.choice(len(P_EVENT), n, p=P_EVENT)),
        "dialogue": (P_DIALOGUE, rng.choice(len(P_DIALOGUE), n, p=P_DIALOGUE)),
        "outcome": (P_OUTCOME, rng.choice(len(P_OUTCOME), n, p=P_OUTCOME)),
        "ending": (P_ENDING, rng.choice(len(P_ENDING), n, p=P_ENDING)),
    }
    logprob = sum(np.log(p[idx]) for p, idx in choices.values())
    picks = {k: idx for k, (_, idx) in choices.items()}
    return [Story(render(**{k: int(v[i]) for k, v in picks.items()}), float(logprob[i]))
            for i in range(n)]


def entropy_per_story() -> float:
    """The grammar's exact entropy in nats per story (slots are independent)."""
    def h(p):
        return float(-(p * np.log(p)).sum())
    return sum(h(p) for p in (P_NAME, P_ADJ, P_KIND, P_PLACE, P_GOAL, P_EVENT, P_DIALOGUE,
                              P_OUTCOME, P_ENDING))


def distinct_stories() -> int:
    return (len(NAMES) * len(ADJECTIVES) * len(KINDS) * len(PLACES) * len(GOALS) * 3
            * len(EVENTS) * len(DIALOGUE) * len(ENDINGS))


def _alternatives(options) -> str:
    import re

    return "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))


_PATTERN = None


def _pattern():
    """The grammar's stories as one regular expression, a named group per slot."""
    import re

    global _PATTERN
    if _PATTERN is None:
        outcomes = {o for _, os in GOALS for o in os}
        _PATTERN = re.compile(
            rf"Once upon a time, there was (?P<article>an?) (?P<adj>{_alternatives(ADJECTIVES)}) "
            rf"(?P<kind>{_alternatives(KINDS)}) named (?P<name>{_alternatives(n for n, _ in NAMES)})\. "
            rf"(?P<pronoun>She|He) lived (?P<place>{_alternatives(PLACES)})\. "
            rf"(?P=name) wanted to (?P<goal>{_alternatives(g for g, _ in GOALS)})\. "
            rf"One day, (?P<event>{_alternatives(EVENTS)})\."
            rf'(?: "(?P<dialogue>{_alternatives(d for d in DIALOGUE if d)})!" said (?P=name)\.)?'
            rf" In the end, (?P=name) (?P<outcome>{_alternatives(outcomes)})\. "
            rf"(?P=name) (?P<ending>{_alternatives(ENDINGS)})\.")
    return _PATTERN


def log_probability(text: str) -> float | None:
    """The exact log-probability of `text` under the grammar; None for a text the grammar
    cannot produce (an exact verifier: each slot's options are distinct strings in fixed
    places, so the text determines every choice)."""
    m = _pattern().fullmatch(text)
    if m is None:
        return None
    names = [n for n, _ in NAMES]
    name, adj = names.index(m["name"]), ADJECTIVES.index(m["adj"])
    goal = [g for g, _ in GOALS].index(m["goal"])
    outcomes = GOALS[goal][1]
    if (m["article"] != ("an" if m["adj"][0] in "aeiou" else "a")
            or m["pronoun"].lower() != NAMES[name][1] or m["outcome"] not in outcomes):
        return None
    dialogue = DIALOGUE.index(m["dialogue"]) if m["dialogue"] else 0
    return float(np.log(P_NAME[name]) + np.log(P_ADJ[adj])
                 + np.log(P_KIND[KINDS.index(m["kind"])]) + np.log(P_PLACE[PLACES.index(m["place"])])
                 + np.log(P_GOAL[goal]) + np.log(P_EVENT[EVENTS.index(m["event"])])
                 + np.log(P_DIALOGUE[dialogue]) + np.log(P_OUTCOME[outcomes.index(m["outcome"])])
                 + np.log(P_ENDING[ENDINGS.index(m["ending"])]))
