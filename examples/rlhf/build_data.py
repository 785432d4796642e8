"""Build the data of the preference and RL examples; the output is checked in under examples/rlhf/data/.

    python examples/rlhf/build_data.py prompts    # RL prompts: questions + "Answer in at most 8 words."
    python examples/rlhf/build_data.py reward     # reward-model pairs, labelled by rewards.py (samples SmolLM2)
    python examples/rlhf/build_data.py chitchat   # DPO pairs from chitchat-dataset: real vs mismatched reply

Questions and answers come from the demo's question generator (deltatune.demo.dataset): training
prompts from its train split, held-out prompts from its `heldout` split (entities and phrasings
never seen in training). Reward-model pairs use questions disjoint from the RL prompts; each pair is
ordered by the program-checkable reward in rewards.py, so the reward model learns that reward from
examples, as a reward model learns human preferences. Everything is seeded: rerunning writes the
same files (the `reward` pairs up to the sampled replies of the model, seeded too).
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
DATA = HERE / "data"
INSTRUCTION = "Answer in at most 8 words."
SEED = 0

sys.path.insert(0, str(HERE))
from rewards import concise_answer  # noqa: E402


def write(name: str, rows: list[dict]) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {DATA / name}")


def questions() -> tuple[list[dict], list[dict]]:
    """(training questions, held-out questions) as {question, answer, category}, deduplicated."""
    from deltatune.demo.dataset import build_splits

    splits = build_splits(SEED)
    train, seen = [], set()
    for row in splits["train"] + splits["eval"]:
        question = row["messages"][0]["content"]
        reply = json.loads(row["messages"][1]["content"])
        if question not in seen:
            seen.add(question)
            train.append({"question": question, "answer": reply["answer"], "category": reply["category"]})
    held = [{"question": r["prompt"], "answer": r["answer"], "category": r["category"]} for r in splits["heldout"]]
    rng = random.Random(SEED)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def prompt_of(q: dict) -> str:
    return f"{q['question']} {INSTRUCTION}"


def build_prompts() -> None:
    train, held = questions()
    rl_train = train[:192]  # train[192:] is kept for the reward model's pairs
    write("rl_train.jsonl", [{"prompt": prompt_of(q), "answer": q["answer"]} for q in rl_train])
    write("rl_heldout.jsonl", [{"prompt": prompt_of(q), "answer": q["answer"]} for q in held[:32]])


def build_reward_pairs() -> None:
    """Two pairs per question: a short right answer vs (a) the base model's own sampled reply,
    (b) a short wrong answer (another question's answer of the same category). Kept only when the
    checker prefers the chosen reply."""
    import torch
    from deltatune.generate import generate

    from deltatune.models import load_model

    torch.manual_seed(SEED)
    train, held = questions()
    splits = {"reward_train.jsonl": train[192:], "reward_eval.jsonl": held[32:]}
    model, tokenizer = load_model("smollm2-135m-instruct")
    model.eval()
    rng = random.Random(SEED)
    by_category: dict[str, list[str]] = {}
    for q in train + held:
        by_category.setdefault(q["category"], []).append(q["answer"])
    for name, qs in splits.items():
        prompts = [prompt_of(q) for q in qs]
        samples = generate(model, tokenizer, prompts, max_new_tokens=40, sample=True, temperature=1.0, top_p=1.0)
        rows = []
        for q, prompt, sample in zip(qs, prompts, samples, strict=True):
            template = rng.choice(["{a}.", "It is {a}.", "The answer is {a}.", "{a}!"])
            good = template.format(a=q["answer"])
            wrong = rng.choice([a for a in by_category[q["category"]] if a.lower() != q["answer"].lower()])
            bad_short = template.format(a=wrong)
            for bad in (sample, bad_short):
                chosen_r, rejected_r = concise_answer([prompt] * 2, [good, bad], answer=[q["answer"]] * 2)
                if chosen_r > rejected_r:
                    rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
        write(name, rows)


def build_chitchat_pairs() -> None:
    """prompt = one chat turn (a question), chosen = the reply that followed it, rejected = a reply
    of similar length from another conversation."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        raise SystemExit("chitchat-dataset is not installed: pip install --no-deps chitchat-dataset==0.9.0")
    data = json.loads((Path(spec.origin).parent / "dataset.json").read_text())
    rng = random.Random(SEED)
    exchanges, replies = [], []
    for conv_id in sorted(data):
        turns = [" ".join(m["text"].strip() for m in turn) for turn in data[conv_id]["messages"]]
        for i in range(1, len(turns)):
            prompt, reply = turns[i - 1], turns[i]
            if 8 <= len(reply) <= 120:
                replies.append((conv_id, reply))
            if prompt.endswith("?") and 10 <= len(prompt) <= 150 and 8 <= len(reply) <= 120:
                exchanges.append((conv_id, prompt, reply))
    rng.shuffle(exchanges)
    by_length = sorted(replies, key=lambda r: len(r[1]))
    lengths = [len(r[1]) for r in by_length]

    def mismatched(conv_id: str, reply: str) -> str:
        import bisect

        lo = bisect.bisect_left(lengths, int(len(reply) * 0.8))
        hi = bisect.bisect_right(lengths, int(len(reply) * 1.2))
        while True:
            other_conv, other = by_length[rng.randrange(lo, max(hi, lo + 1))]
            if other_conv != conv_id and other != reply:
                return other

    rows = [{"prompt": p, "chosen": r, "rejected": mismatched(c, r)} for c, p, r in exchanges[:640]]
    write("chitchat_train.jsonl", rows[:512])
    write("chitchat_eval.jsonl", rows[512:])


if __name__ == "__main__":
    jobs = {"prompts": build_prompts, "reward": build_reward_pairs, "chitchat": build_chitchat_pairs}
    for job in sys.argv[1:] or list(jobs):
        jobs[job]()
