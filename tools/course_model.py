"""Train (or load) the cached course models before the notebooks need them.

    python tools/course_model.py

`make test` runs this first: the course model (``minigpt.pretrained``), the
assistant base model, the assistant and translator tuned from it
(``minigpt.assistant``), the chat model tuned from the assistant
(``minigpt.conversations``), chapter 08's reward model, DPO, RLVR and RLHF runs
(``minigpt.aligned``), chapter 09's two-layer copying model (``minigpt.circuits``) and
chapter 10's scaling sweep and GPT-vs-GRU race (``minigpt.scaling``) take a few minutes
each to train from an empty cache, and a notebook cell that waited for it would
run into nbval's cell timeout. It trains with one thread, as the notebook kernels
do (see conftest.py), so the model is bit for bit the one the stored outputs came
from. Like conftest.py, it reads the data from ../shared/data beside the checkout
when MINIGPT_DATA_DIR is unset and that folder exists.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "MINIGPT_DATA_DIR" not in os.environ and shared.is_dir():
    os.environ["MINIGPT_DATA_DIR"] = str(shared)

from minigpt.aligned import aligned_model, course_reward_model  # noqa: E402
from minigpt.assistant import assistant_model, translator_model  # noqa: E402
from minigpt.circuits import induction_model  # noqa: E402
from minigpt.conversations import chat_model  # noqa: E402
from minigpt.pretrained import (  # noqa: E402
    assistant_base_history,
    assistant_base_model,
    shakespeare_char_history,
    shakespeare_char_model,
)
from minigpt.scaling import race, scaling_sweep  # noqa: E402


def shakespeare() -> str:
    start = time.perf_counter()
    model, _ = shakespeare_char_model()
    _, val = shakespeare_char_history()
    course = (
        f"course model ready in {time.perf_counter() - start:.0f} s: "
        f"{model.num_parameters():,} parameters, validation loss {val:.3f}"
    )
    start = time.perf_counter()
    _, _, record = induction_model()
    return course + (
        f"\ncopying model ready in {time.perf_counter() - start:.0f} s: "
        f"induction score {record['induction_score'][-1]:.2f}"
    )


def scaling() -> str:
    start = time.perf_counter()
    runs = scaling_sweep()
    race()
    return f"scaling sweep ({len(runs)} runs) and race ready in {time.perf_counter() - start:.0f} s"


def chat() -> str:
    # the chat model is tuned from the assistant, the reward model from the assistant's
    # pretrained base: each waits (on the cache's lock) while the other chain builds it
    lines = []
    for name, build in (("chat", chat_model), ("reward model", course_reward_model)):
        start = time.perf_counter()
        _, _, record = build()
        took = time.perf_counter() - start
        lines.append(f"{name} ready in {took:.0f} s (trained in {record['seconds']:.0f} s)")
    return "\n".join(lines)


def main() -> int:
    # Two chains of one-thread trainings, one per core (from an empty cache on the 2-core
    # machine, about 19 and 16 minutes, and about 3 more here since the translator's 8,000
    # steps in December 2026, 437 s at one thread): the Shakespeare course model, chapter 09's
    # copying model, chapter 10's scaling runs, then chapter 08's chat model and reward
    # model in a second process; the assistant's base, tasks and translation models and
    # chapter 08's DPO, RLVR and RLHF runs here.
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        course = pool.submit(shakespeare)
        sweep = pool.submit(scaling)
        chatting = pool.submit(chat)
        start = time.perf_counter()
        assistant_base_model(progress=sys.stderr.isatty())
        _, val = assistant_base_history()
        print(
            f"assistant base model ready in {time.perf_counter() - start:.0f} s: "
            f"validation loss {val:.3f}"
        )
        builds = (("assistant", assistant_model), ("translator", translator_model))
        builds += tuple(
            (run, partial(aligned_model, run)) for run in ("dpo", "rlvr", "rlhf", "rlhf_no_kl")
        )
        for name, build in builds:
            start = time.perf_counter()
            _, _, record = build()
            print(
                f"{name} ready in {time.perf_counter() - start:.0f} s "
                f"(trained in {record['seconds']:.0f} s)"
            )
        print(course.result())
        print(sweep.result())
        print(chatting.result())
    return 0


if __name__ == "__main__":
    sys.exit(main())
