"""Texts far from the demo intents (a shifted distribution), generated from templates."""

from __future__ import annotations

import itertools
import random

_TEMPLATES = [
    "what will the weather be like in {city} on {day}",
    "who won the {sport} match in {city} last {day}",
    "give me a recipe for {dish} that takes under an hour",
    "how many calories are in a portion of {dish}",
    "recommend a good novel to read on a rainy {day}",
    "what time does the sun set in {city} in {month}",
    "translate 'good morning' into the language spoken in {city}",
    "how do I train for a marathon in {month}",
    "is it worth visiting {city} in {month}",
    "what are the rules of {sport} for beginners",
    "play some relaxing jazz music for my {day} evening",
    "how tall is the tallest building in {city}",
]
_FILL = {
    "city": ["Lisbon", "Osaka", "Nairobi", "Toronto", "Helsinki", "Lima", "Hanoi", "Cairo",
             "Oslo", "Quito", "Perth", "Seville"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "sport": ["cricket", "rugby", "volleyball", "curling", "handball", "water polo"],
    "dish": ["lentil soup", "risotto", "pad thai", "banana bread", "falafel", "paella",
             "miso ramen", "shepherd's pie"],
    "month": ["January", "March", "May", "July", "October", "December"],
}


def offtopic_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct texts (at most about 2,500 exist), in a seeded random order."""
    rng = random.Random(seed)
    texts: dict[str, None] = {}
    for _, template in zip(range(200 * n), itertools.cycle(_TEMPLATES)):
        if len(texts) >= n:
            break
        texts[template.format(**{k: rng.choice(v) for k, v in _FILL.items()})] = None
    return list(texts)
