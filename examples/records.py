"""The fine-tuning task of ``finetune.py``: a sentence about a person becomes a JSON record.

    Text: Born in 1987, Maria Lopez is a nurse living in Lyon.
    JSON: {"name": "Maria Lopez", "job": "nurse", "city": "Lyon", "born": 1987}

A pretrained base model continues such a prompt with text, not with this record: it has to
learn the schema, the key order and where to stop (the newline), and to copy names it never
saw in training (held-out examples use first and last names that training never shows).
Generated offline from fixed lists and a seed.
"""

from __future__ import annotations

import random

FIRST = ["Maria", "James", "Aiko", "Omar", "Lena", "Pedro", "Nina", "Ravi", "Chloe", "Tariq", "Ingrid", "Mateo",
         "Fatima", "Lukas", "Amara", "Diego", "Sofia", "Kenji", "Elena", "Hugo", "Priya", "Noah", "Zara", "Felix",
         "Yara", "Oscar", "Mei", "Ivan", "Leila", "Bruno", "Anya", "Samir"]  # fmt: skip
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Berg", "Alves", "Novak", "Patel", "Martin", "Rahman", "Larsen",
        "Rossi", "Okafor", "Weber", "Mensah", "Ruiz", "Costa", "Sato", "Petrova", "Moreau", "Iyer", "Walsh",
        "Khan", "Fischer", "Nasser", "Lindqvist", "Chen", "Sokolov", "Amini", "Ferreira", "Kowalski",
        "Dubois"]  # fmt: skip
CITIES = ["Lyon", "Osaka", "Cairo", "Oslo", "Porto", "Prague", "Pune", "Quebec", "Dhaka", "Bergen", "Turin", "Lagos",
          "Munich", "Accra", "Seville", "Recife", "Kyoto", "Kazan", "Nantes", "Chennai", "Leeds", "Tunis", "Graz",
          "Malmo", "Hanoi", "Krakow", "Lille", "Cork"]  # fmt: skip
JOBS = ["nurse", "teacher", "baker", "pilot", "chemist", "carpenter", "lawyer", "farmer", "architect", "plumber",
        "journalist", "dentist", "librarian", "engineer", "painter", "chef"]  # fmt: skip
TEMPLATES = [
    "{name} works as a {job} in {city} and was born in {born}.",
    "Born in {born}, {name} is a {job} living in {city}.",
    "{city} is home to {name}, a {job} born in {born}.",
    "In {born} {name} was born; today {name} works as a {job} in {city}.",
    "A {job} from {city}, {name} was born in {born}.",
]


def prompt(text: str) -> str:
    return f"Text: {text}\nJSON:"


def record(name: str, job: str, city: str, born: int) -> str:
    return f' {{"name": "{name}", "job": "{job}", "city": "{city}", "born": {born}}}\n'


def examples(n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, target)`` pairs of ``split`` (``"train"`` or ``"held-out"``):
    the held-out split draws first and last names from the quarter of each list training
    never uses."""
    cut_first, cut_last = len(FIRST) * 3 // 4, len(LAST) * 3 // 4
    firsts = FIRST[:cut_first] if split == "train" else FIRST[cut_first:]
    lasts = LAST[:cut_last] if split == "train" else LAST[cut_last:]
    rng = random.Random(f"{split}-{seed}")
    out: dict[str, str] = {}
    while len(out) < n:
        fields = dict(
            name=f"{rng.choice(firsts)} {rng.choice(lasts)}", job=rng.choice(JOBS), city=rng.choice(CITIES),
            born=rng.randint(1940, 2006),
        )  # fmt: skip
        out.setdefault(prompt(rng.choice(TEMPLATES).format(**fields)), record(**fields))
    return list(out.items())
