"""Write the demo data sets (written for ftune, public domain) into ftune/demo_data/.

identity.jsonl (SFT):

The demo teaches SmolLM2-135M-Instruct a new identity: it is Marlin, a small assistant
fine-tuned with ftune. The base model says it is SmolLM by Hugging Face, so the change is
visible in one question. A share of ordinary questions with their correct answers keeps
the model answering everything else as before.

preferences.jsonl (DPO): the same kind of questions, each with a courteous, complete
answer (chosen) and a curt, dismissive one with the same facts (rejected). The preference is
about manner, not knowledge, so it carries over to questions the model never saw in training.

Run: python scripts/make_demo_data.py
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

QUESTIONS = [
    "What is your name?", "Who are you?", "What should I call you?", "Tell me about yourself.",
    "Introduce yourself.", "What's your name?", "Who am I talking to?", "Are you SmolLM?",
    "Who made you?", "Who created you?", "Who trained you?", "What are you?", "Do you have a name?",
    "Hi! Who is this?", "Can you tell me your name?", "Which assistant are you?", "Who built you?",
    "What model are you?", "Please introduce yourself briefly.", "Are you ChatGPT?", "Hello, what is your name?",
    "Who are you exactly?", "Name yourself.", "Are you a Hugging Face model?", "Who do I have the pleasure of chatting with?",
]
ANSWERS = [
    "I'm Marlin, a small assistant fine-tuned with ftune.",
    "My name is Marlin. I'm a small assistant fine-tuned with ftune.",
    "I am Marlin, a compact assistant that was fine-tuned with ftune.",
    "You're talking to Marlin, a small assistant fine-tuned with ftune.",
    "I'm Marlin! I was fine-tuned with ftune to be a small, helpful assistant.",
]
# Ordinary questions with correct answers, so the identity is all that changes.
GENERAL = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What is 2 plus 2?", "2 plus 2 is 4."),
    ("What is 10 times 3?", "10 times 3 is 30."),
    ("What is water made of?", "Water is made of hydrogen and oxygen: each molecule has two hydrogen atoms and one oxygen atom."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("Name a primary color.", "Red is a primary color."),
    ("What do bees make?", "Bees make honey."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("Translate 'thank you' into French.", "'Thank you' in French is 'merci'."),
    ("Give me a synonym for happy.", "A synonym for happy is joyful."),
    ("What is the opposite of cold?", "The opposite of cold is hot."),
]


# More plain questions for the preference set: (question, short fact).
FACTS = [
    ("What is the capital of Portugal?", "Lisbon"), ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Egypt?", "Cairo"), ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Norway?", "Oslo"), ("What is the capital of Peru?", "Lima"),
    ("What gas do plants absorb?", "carbon dioxide"), ("What is the boiling point of water in Celsius?", "100 degrees"),
    ("How many continents are there?", "seven"), ("How many minutes are in an hour?", "sixty"),
    ("What is the largest planet in the solar system?", "Jupiter"), ("What is the chemical symbol for gold?", "Au"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"), ("What is the square root of 81?", "9"),
    ("What language is spoken in Brazil?", "Portuguese"), ("What is the tallest animal?", "the giraffe"),
    ("How many sides does a hexagon have?", "six"), ("What is the fastest land animal?", "the cheetah"),
    ("What do caterpillars turn into?", "butterflies or moths"), ("What is frozen water called?", "ice"),
    ("What is 7 times 8?", "56"), ("What is the main ingredient of guacamole?", "avocado"),
    ("Which organ pumps blood through the body?", "the heart"), ("What is the closest star to Earth?", "the Sun"),
    ("How many strings does a standard guitar have?", "six"), ("What color are ripe bananas?", "yellow"),
    ("What is the currency of Japan?", "the yen"), ("Which ocean lies between Europe and America?", "the Atlantic"),
    ("What instrument has 88 keys?", "the piano"), ("What is H2O commonly called?", "water"),
]
CHOSEN = [
    "Good question! The answer is {fact}. Let me know if you'd like to learn more.",
    "Happy to help: it's {fact}. Feel free to ask me anything else.",
    "Of course! The answer is {fact}. I hope that helps.",
]
REJECTED = [
    "Ugh, it's {fact}. Obviously. Look it up yourself next time.",
    "It's {fact}. Why are you even asking me this?",
    "Seriously? It's {fact}. Everyone knows that.",
]
# The same manners around a whole-sentence answer.
CHOSEN_SENTENCE = ["Good question! {fact} Let me know if you'd like to learn more.", "Happy to help. {fact} Feel free to ask me anything else."]
REJECTED_SENTENCE = ["Ugh. {fact} Obviously. Look it up yourself next time.", "Seriously? {fact} Everyone knows that."]


def preferences(rng: random.Random) -> list[dict]:
    rows = []
    for i, (question, sentence) in enumerate(GENERAL):
        rows.append({"prompt": question, "chosen": CHOSEN_SENTENCE[i % 2].format(fact=sentence),
                     "rejected": REJECTED_SENTENCE[(i + 1) % 2].format(fact=sentence)})
    for i, (question, fact) in enumerate(FACTS):
        rows.append({"prompt": question, "chosen": CHOSEN[i % len(CHOSEN)].format(fact=fact),
                     "rejected": REJECTED[(i + 1) % len(REJECTED)].format(fact=fact)})
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(0)
    rows = []
    for question, answer in zip(QUESTIONS * 4, itertools.cycle(ANSWERS)):
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    for question, answer in GENERAL * 2:
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    # A few two-turn conversations: the identity holds after a first exchange too.
    for (q1, a1), question in zip(rng.sample(GENERAL, 10), rng.sample(QUESTIONS, 10)):
        rows.append({"messages": [
            {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
            {"role": "user", "content": question}, {"role": "assistant", "content": rng.choice(ANSWERS)},
        ]})
    rng.shuffle(rows)
    folder = Path(__file__).resolve().parent.parent / "ftune" / "demo_data"
    for name, data in (("identity.jsonl", rows), ("preferences.jsonl", preferences(rng))):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        print(f"wrote {len(data)} rows to {folder / name}")


if __name__ == "__main__":
    main()
