"""The benchmark's chat prompts: 16 of varied lengths (about 30 to 630 tokens) by default."""

from __future__ import annotations

import json
from pathlib import Path

SYSTEM = "You are a concise assistant. Answer clearly and stay on topic."
PASSAGE = (
    "The town of Hollowmere sits where two rivers meet, and for three hundred years its people "
    "earned their living from the water. Mills along the eastern bank ground grain for farms as far "
    "as the hills, while boatmen on the western river carried timber, wool and salt down to the "
    "coast. When the railway arrived in 1861 the boatmen lost most of their trade within a decade, "
    "but the mills adapted: they began to generate electricity, first for their own machinery and "
    "later for the street lamps of the town square. By 1900 Hollowmere was one of the first towns "
    "in the region with electric light, and visitors came from the city simply to walk under it. "
    "The mills closed one by one after the Second World War, when cheaper power came from the "
    "national grid. Today the largest of them is a museum, and the old towpath along the western "
    "river is a cycling route that follows the water for forty kilometres to the sea. "
)
QUESTIONS = [
    "Hi!",
    "What is the capital of Japan?",
    "List three prime numbers larger than fifty.",
    "Write a haiku about a lighthouse in winter.",
    "Explain in simple words why bread rises when it is baked, for a child who loves cooking.",
    "Give me four tips for keeping a houseplant alive when I travel for two weeks in summer.",
    "Translate into French: 'The library opens at nine and closes at five on weekdays.'",
    "I am planning a small garden on a sunny balcony of about six square metres. I would like "
    "herbs for cooking, a few flowers for bees, and maybe one vegetable. The balcony gets wind in "
    "the afternoon. What should I plant, and in what kind of containers?",
    "Summarise the following text in two sentences.\n\n" + PASSAGE,
    "My bicycle chain keeps slipping when I pedal hard uphill, mostly in the smallest rear gear. "
    "The bike is about five years old and I ride it every day to work, about eight kilometres each "
    "way, in all weather. I clean it sometimes but never replaced anything. What is the most "
    "likely cause, and what should I check first before taking it to a shop?",
    "Read this and answer: why did the boatmen lose their trade?\n\n" + PASSAGE * 2,
    "Write a short friendly email to a neighbour asking to borrow a ladder on Saturday morning.",
    "Here are my notes from a meeting. Turn them into a numbered list of action items.\n\n"
    "Anna will send the budget draft by Tuesday. Ben is unsure about the venue and will call two "
    "alternatives. We agreed the newsletter goes out on the first of the month from now on. Carla "
    "asked for volunteers for the registration desk; nobody has signed up yet. The printer in the "
    "office is broken again and someone needs to contact the repair company. Next meeting on the "
    "twelfth, same time, and Ben will bring the venue quotes.",
    "Describe the water cycle.",
    "Compare these two accounts and list three differences.\n\nAccount one: " + PASSAGE
    + "\n\nAccount two: " + PASSAGE.replace("1861", "1874").replace("forty", "thirty") * 2,
    "What is seven times eight?",
]


def build_chats(num_prompts: int) -> list[list[dict[str, str]]]:
    """`num_prompts` chats of varied lengths; every other one has a system message."""
    chats = []
    for i in range(num_prompts):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i >= len(QUESTIONS):  # keep prompts distinct past the base set
            question = f"(Request {i}) {question}"
        head = [{"role": "system", "content": SYSTEM}] if i % 2 else []
        chats.append(head + [{"role": "user", "content": question}])
    return chats


def write_prompts_file(path: Path, chats: list[list[dict[str, str]]], max_tokens: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": c, "ignore_eos": True, "min_tokens": max_tokens}) for c in chats]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
