"""The demo's data: questions answered in one fixed JSON shape, written by this script.

Behaviour taught: every reply is exactly `{"answer": "...", "category": "..."}`, with the
category one of math, geography, language, science. SmolLM2-135M-Instruct answers in prose, so
a program can score the behaviour: the reply parses as that JSON object with the right category.

Held-out prompts use entities (numbers, countries, words, elements) and phrasings that never
occur in training. Regenerate the checked-in files with:

    python -m deltatune.demo.dataset src/deltatune/demo/data
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

__all__ = ["CATEGORIES", "build_splits", "write_splits", "reply", "score_reply"]

CATEGORIES = ("math", "geography", "language", "science")

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Australia": "Canberra", "Russia": "Moscow", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Nigeria": "Abuja",
    "Morocco": "Rabat", "Cuba": "Havana", "Colombia": "Bogota", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Iran": "Tehran", "Iraq": "Baghdad",
    "South Korea": "Seoul", "Philippines": "Manila", "Ukraine": "Kyiv", "Czechia": "Prague",
    "Romania": "Bucharest", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Venezuela": "Caracas",
}
CONTINENTS = {
    "France": "Europe", "Japan": "Asia", "Kenya": "Africa", "Canada": "North America", "Peru": "South America",
    "Australia": "Oceania", "Norway": "Europe", "India": "Asia", "Egypt": "Africa", "Mexico": "North America",
    "Chile": "South America", "Poland": "Europe", "Thailand": "Asia", "Nigeria": "Africa", "Cuba": "North America",
    "Colombia": "South America", "Greece": "Europe", "Vietnam": "Asia", "Ghana": "Africa", "Argentina": "South America",
}
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
    "open": "closed", "early": "late", "strong": "weak", "rich": "poor", "young": "old", "full": "empty",
    "hard": "soft", "high": "low", "wet": "dry", "loud": "quiet", "clean": "dirty", "long": "short",
    "thick": "thin", "cheap": "expensive", "true": "false", "win": "lose", "buy": "sell", "push": "pull",
    "inside": "outside", "first": "last", "near": "far", "heavy": "light", "begin": "end", "awake": "asleep",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
    "box": "boxes", "city": "cities", "leaf": "leaves", "knife": "knives", "cat": "cats", "bus": "buses",
    "baby": "babies", "goose": "geese", "person": "people", "wolf": "wolves", "dish": "dishes", "story": "stories",
    "sheep": "sheep", "fish": "fish", "potato": "potatoes", "hero": "heroes", "city block": "city blocks",
    "church": "churches", "ox": "oxen", "cactus": "cacti", "party": "parties", "glass": "glasses",
}
WORDS = [
    "house", "garden", "river", "planet", "window", "pencil", "orange", "forest", "bridge", "rocket",
    "guitar", "dragon", "castle", "silver", "winter", "summer", "market", "doctor", "puzzle", "candle",
    "tomato", "island", "button", "mirror", "engine", "camera", "ticket", "basket", "jacket", "wizard",
]
ELEMENTS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "copper": "Cu", "oxygen": "O", "hydrogen": "H",
    "carbon": "C", "nitrogen": "N", "sodium": "Na", "potassium": "K", "calcium": "Ca", "helium": "He",
    "neon": "Ne", "lead": "Pb", "tin": "Sn", "zinc": "Zn", "mercury": "Hg", "sulfur": "S", "chlorine": "Cl",
    "magnesium": "Mg", "aluminium": "Al", "silicon": "Si", "uranium": "U", "platinum": "Pt", "nickel": "Ni",
    "iodine": "I", "phosphorus": "P", "lithium": "Li", "argon": "Ar", "fluorine": "F",
}
LEGS = {
    "spider": "8", "ant": "6", "dog": "4", "bird": "2", "horse": "4", "beetle": "6", "octopus": "8",
    "chicken": "2", "cat": "4", "bee": "6", "scorpion": "8", "cow": "4", "duck": "2", "butterfly": "6",
    "crab": "10", "lion": "4", "penguin": "2", "fly": "6", "tick": "8", "goat": "4",
}
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]

Question = tuple[str, str, str]  # (prompt, answer, category)


def reply(answer: str, category: str) -> str:
    """The exact reply shape the demo teaches."""
    return json.dumps({"answer": answer, "category": category})


def _split(items: list, seed: int, held_out: float = 0.25) -> tuple[list, list]:
    items = sorted(items)
    random.Random(seed).shuffle(items)
    cut = max(1, int(len(items) * held_out))
    return items[cut:], items[:cut]


def _questions(split: str, seed: int) -> list[Question]:
    """All questions of one split: `train`/`eval` share entities and phrasings; `heldout` uses others."""
    rng = random.Random(f"{seed}-{split}")
    held = split == "heldout"
    pick = 1 if held else 0
    countries = _split(list(CAPITALS), seed)[pick]
    continents = _split(list(CONTINENTS), seed)[pick]
    antonyms = _split(list(ANTONYMS), seed)[pick]
    plurals = _split(list(PLURALS), seed)[pick]
    words = _split(WORDS, seed)[pick]
    elements = _split(list(ELEMENTS), seed)[pick]
    animals = _split(list(LEGS), seed)[pick]
    planets = _split(list(range(8)), seed)[pick]
    seen = lambda *p: p if not held else ()  # noqa: E731
    unseen = lambda *p: p if held else ()  # noqa: E731

    questions: list[Question] = []
    lo, hi = (50, 99) if held else (2, 49)
    for phrase in [*seen("What is {a} {w} {b}?", "Compute {a} {o} {b}.", "Calculate {a} {w} {b}."),
                   *unseen("Work out {a} {o} {b} for me.", "Quick question: what does {a} {w} {b} equal?")]:
        for _ in range(28 if not held else 6):
            a, b, op = rng.randint(lo, hi), rng.randint(2, 49), rng.choice("+-*")
            value = {"+": a + b, "-": a - b, "*": a * b}[op]
            word = {"+": "plus", "-": "minus", "*": "times"}[op]
            questions.append((phrase.format(a=a, b=b, o=op, w=word), str(value), "math"))
    for phrase in [*seen("What is the capital of {x}?", "Which city is the capital of {x}?"),
                   *unseen("Name the capital city of {x}.")]:
        questions += [(phrase.format(x=c), CAPITALS[c], "geography") for c in countries]
    for phrase in [*seen("On which continent is {x}?"), *unseen("{x} lies on which continent?")]:
        questions += [(phrase.format(x=c), CONTINENTS[c], "geography") for c in continents]
    for phrase in [*seen("What is the opposite of '{x}'?", "Give the antonym of '{x}'."),
                   *unseen("Tell me a word that means the reverse of '{x}'.")]:
        questions += [(phrase.format(x=w), ANTONYMS[w], "language") for w in antonyms]
    for phrase in [*seen("What is the plural of '{x}'?"), *unseen("More than one '{x}' is called what?")]:
        questions += [(phrase.format(x=w), PLURALS[w], "language") for w in plurals]
    for phrase in [*seen("Spell '{x}' backwards.", "Write '{x}' in capital letters."),
                   *unseen("Reverse the letters of '{x}'.")]:
        transform = (lambda w: w.upper()) if "capital" in phrase else (lambda w: w[::-1])
        questions += [(phrase.format(x=w), transform(w), "language") for w in words]
    for phrase in [*seen("What is the chemical symbol for {x}?", "Which element has the symbol {y}?"),
                   *unseen("Give the periodic-table symbol of {x}.")]:
        for e in elements:
            answer = e if "{y}" in phrase else ELEMENTS[e]
            questions.append((phrase.format(x=e, y=ELEMENTS[e]), answer, "science"))
    for phrase in [*seen("How many legs does a {x} have?"), *unseen("Count the legs of a typical {x}.")]:
        questions += [(phrase.format(x=a), LEGS[a], "science") for a in animals]
    for phrase in [*seen("Which planet is {x} from the Sun?"), *unseen("Counting outward from the Sun, which planet is {x}?")]:
        questions += [(phrase.format(x=ORDINALS[i]), PLANETS[i], "science") for i in planets]
    return questions


def build_splits(seed: int = 0) -> dict[str, list[dict]]:
    """train / eval (same distribution, disjoint examples) and heldout (new entities and phrasings)."""
    pool = _questions("train", seed)
    random.Random(seed).shuffle(pool)
    cut = len(pool) // 10
    conversation = lambda q: {"messages": [{"role": "user", "content": q[0]}, {"role": "assistant", "content": reply(q[1], q[2])}]}  # noqa: E731
    heldout = _questions("heldout", seed)
    return {
        "train": [conversation(q) for q in pool[cut:]],
        "eval": [conversation(q) for q in pool[:cut]],
        "heldout": [{"prompt": q[0], "answer": q[1], "category": q[2]} for q in heldout],
    }


def write_splits(directory: str | Path, seed: int = 0) -> dict[str, int]:
    """Write train.jsonl, eval.jsonl, heldout.jsonl into `directory`; returns the sizes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, rows in build_splits(seed).items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sizes[name] = len(rows)
    return sizes


def score_reply(text: str, category: str, answer: str) -> dict[str, bool]:
    """`format`: the reply is exactly the JSON object with the two keys and the right category;
    `answer`: the expected answer is what it says (case-insensitive)."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        value = None
    shaped = isinstance(value, dict) and set(value) == {"answer", "category"}
    return {
        "format": shaped and value["category"] == category,
        "answer": shaped and str(value["answer"]).strip().lower() == answer.lower(),
    }


if __name__ == "__main__":
    print(write_splits(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "data"))
