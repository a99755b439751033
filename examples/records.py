"""The fine-tuning task of ``finetune.py``: a sentence about a person becomes a JSON record.

    Text: Born in 1987, Maria Lopez is a nurse living in Lyon.
    JSON: {"name": "Maria Lopez", "job": "nurse", "city": "Lyon", "born": 1987}

A pretrained base model continues such a prompt with text, not with this record: it has to
learn the schema, the key order and where to stop (the newline), and to copy names, jobs and
cities wherever the sentence puts them. Generated offline from fixed lists and a seed, in
three splits that share nothing they need not share:

- ``"train"``: three quarters of every list (first names, last names, jobs, cities) and of
  the phrasings;
- ``"held-out"``: first and last names from the quarter training never shows; jobs, cities
  and phrasings from training's;
- ``"unseen"``: names, jobs, cities *and* phrasings all from the quarters training never
  shows: the closest this task gets to a sentence a user writes.
"""

from __future__ import annotations

import random

FIRST = """Maria James Aiko Omar Lena Pedro Nina Ravi Chloe Tariq Ingrid Mateo Fatima Lukas Amara Diego
Sofia Kenji Elena Hugo Priya Noah Zara Felix Yara Oscar Mei Ivan Leila Bruno Anya Samir Grace Tomas Hana Kofi
Marta Arjun Clara Emil Noor Pablo Alice Jonas Rosa Yusuf Ines Viktor Sara Daniel Olga Malik Julia Anton Lucia
Karim Eva Hiroshi Nadia Paul Ayla Marco Irene Tobias Laila Andre Helena Rafael Mira Simon Dalia Stefan Beatriz
Farid Alma Lars Naomi Gabriel Esra Milan Rania Adrian Selin Ahmed Vera Nikolai Lina Mohamed Dana Petra Joao Keiko
Musa Ada Carlos Freya Idris Luz Boris Maya Tariku Elif Sven Ana""".split()
LAST = """Lopez Smith Tanaka Haddad Berg Alves Novak Patel Martin Rahman Larsen Rossi Okafor Weber Mensah Ruiz
Costa Sato Petrova Moreau Iyer Walsh Khan Fischer Nasser Lindqvist Chen Sokolov Amini Ferreira Kowalski Dubois
Garcia Mueller Yamamoto Hassan Nilsen Santos Horvat Gupta Bernard Chowdhury Hansen Romano Adeyemi Schmidt Owusu
Navarro Silva Kato Ivanova Laurent Nair Murphy Ali Wagner Saleh Eriksson Wang Volkov Karimi Pereira Nowak Lefebvre
Torres Becker Nakamura Mansour Jensen Marino Eze Hoffmann Boateng Herrera Ribeiro Suzuki Popova Girard Menon
Byrne Qureshi Schulz Aziz Holm Liu Morozov Tehrani Carvalho Wojcik Fontaine Ortiz Keller Ito Darwish Dahl
Greco Nwosu Richter Asante Molina Lima Kimura Smirnova Roux Pillai Doyle""".split()
CITIES = ["Lyon", "Osaka", "Cairo", "Oslo", "Porto", "Prague", "Pune", "Quebec", "Dhaka", "Bergen", "Turin", "Lagos",
          "Munich", "Accra", "Seville", "Recife", "Kyoto", "Kazan", "Nantes", "Chennai", "Leeds", "Tunis", "Graz",
          "Malmo", "Hanoi", "Krakow", "Lille", "Cork", "Rio de Janeiro", "New Delhi", "San Diego", "Buenos Aires",
          "Cape Town", "Kuala Lumpur", "Mexico City", "Hong Kong", "Tel Aviv", "Salt Lake City", "Las Palmas",
          "Sao Paulo", "Vienna", "Dublin", "Nairobi", "Lima", "Bogota", "Manila", "Seoul", "Perth", "Denver",
          "Austin", "Boston", "Calgary", "Geneva", "Zurich", "Bilbao", "Valencia", "Naples", "Genoa", "Ghent",
          "Utrecht", "Aarhus", "Tampere", "Riga", "Vilnius", "Tallinn", "Sofia", "Izmir", "Tbilisi", "Baku",
          "Almaty", "Lahore", "Kochi", "Jaipur", "Colombo", "Cebu", "Busan", "Sapporo", "Auckland", "Hobart",
          "Santiago", "Quito", "Havana", "Dakar", "Kampala", "Marrakesh", "Alexandria", "Beirut", "Muscat",
          "Nagoya", "Halifax", "Winnipeg", "Portland", "Memphis", "Tucson", "Glasgow", "Bristol"]  # fmt: skip
JOBS = ["nurse", "teacher", "baker", "pilot", "chemist", "carpenter", "lawyer", "farmer", "architect", "plumber",
        "journalist", "dentist", "librarian", "engineer", "painter", "chef", "software developer", "bus driver",
        "electrician", "pharmacist", "data analyst", "accountant", "translator", "firefighter", "veterinarian",
        "photographer", "midwife", "tailor", "geologist", "physiotherapist", "barista", "mechanic",
        "civil engineer", "florist", "police officer", "social worker", "web designer", "surgeon", "economist",
        "optician", "welder", "biologist", "tour guide", "butcher", "paramedic", "historian", "game designer",
        "radio host", "zookeeper", "locksmith", "nutritionist", "air traffic controller", "sculptor",
        "interior designer", "marine biologist", "train conductor", "jeweller", "beekeeper", "park ranger",
        "sound engineer"]  # fmt: skip
TEMPLATES = [
    "{name} works as {a_job} in {city} and was born in {born}.",
    "Born in {born}, {name} is {a_job} living in {city}.",
    "{city} is home to {name}, {a_job} born in {born}.",
    "In {born} {name} was born; today they work as {a_job} in {city}.",
    "{A_job} from {city}, {name} was born in {born}.",
    "{name} ({born}) is {a_job} based in {city}.",
    "Meet {name}: born {born}, lives in {city}, works as {a_job}.",
    "{name}, born in {born}, has worked as {a_job} in {city} for years.",
    "Since moving to {city}, {name} ({born}) has been {a_job}.",
    "Our new colleague {name} is {a_job} who lives in {city}; birth year {born}.",
    "{name} was born in {born}, lives in {city} and is {a_job}.",
    "Name: {name}. Job: {job}. City: {city}. Born: {born}.",
    "The {job} {name} lives in {city} and was born in {born}.",
    "You can find {name}, {a_job}, in {city}. Born {born}.",
    "{name}, born {born}, now works in {city} as {a_job}.",
    "Working in {city} as {a_job}, {name} was born in {born}.",
    "I met {name} in {city}: {a_job}, born in {born}.",
    "{name} | {job} | {city} | born {born}",
    "Ask anyone in {city} about {name}, the {job} born in {born}.",
    "{born}: the year {name}, now {a_job} in {city}, was born.",
    "Profile - {name}, {job}, {city}, b. {born}.",
    "After years abroad, {name} ({job}, born {born}) settled in {city}.",
    "{name} is {a_job}. Home: {city}. Born: {born}.",
    "Everyone in {city} knows {name}, {a_job} born in {born}.",
]


def prompt(text: str) -> str:
    return f"Text: {text}\nJSON:"


def record(name: str, job: str, city: str, born: int) -> str:
    return f' {{"name": "{name}", "job": "{job}", "city": "{city}", "born": {born}}}\n'


def _part(items: list, split: str, fields: bool) -> list:
    """Training's three quarters of ``items``, or the quarter it never sees (for names in both
    other splits; for jobs, cities and phrasings in ``"unseen"`` only)."""
    cut = len(items) * 3 // 4
    unseen = split == "unseen" or (split == "held-out" and not fields)
    return items[cut:] if unseen else items[:cut]


def examples(n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, target)`` pairs of ``split``: ``"train"``, ``"held-out"`` (names
    never seen in training) or ``"unseen"`` (names, jobs, cities and phrasings never seen)."""
    if split not in ("train", "held-out", "unseen"):
        raise ValueError(f"split must be 'train', 'held-out' or 'unseen', found {split!r}")
    firsts, lasts = _part(FIRST, split, False), _part(LAST, split, False)
    jobs, cities, templates = (_part(xs, split, True) for xs in (JOBS, CITIES, TEMPLATES))
    rng = random.Random(f"{split}-{seed}")
    out: dict[str, str] = {}
    while len(out) < n:
        name, job, city = f"{rng.choice(firsts)} {rng.choice(lasts)}", rng.choice(jobs), rng.choice(cities)
        born = rng.randint(1940, 2006)
        a_job = ("an " if job[0] in "aeiou" else "a ") + job
        text = rng.choice(templates).format(name=name, job=job, a_job=a_job, A_job=a_job.capitalize(), city=city,
                                            born=born)  # fmt: skip
        out.setdefault(prompt(text), record(name, job, city, born))
    return list(out.items())
