"""Train (or load) the cached course models before the notebooks need them.

    python tools/course_model.py

`make test` runs this first: the course model (``minigpt.pretrained``), the
assistant base model, the assistant and translator tuned from it
(``minigpt.assistant``), the chat model tuned from the assistant
(``minigpt.conversations``), and chapter 08's reward model, DPO, RLVR and RLHF runs
(``minigpt.aligned``) take a few minutes each to train from an empty cache, and a notebook cell that waited for it would
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
from minigpt.conversations import chat_model  # noqa: E402
from minigpt.pretrained import (  # noqa: E402
    assistant_base_history,
    assistant_base_model,
    shakespeare_char_history,
    shakespeare_char_model,
)


def shakespeare() -> str:
    start = time.perf_counter()
    model, _ = shakespeare_char_model()
    _, val = shakespeare_char_history()
    return (
        f"course model ready in {time.perf_counter() - start:.0f} s: "
        f"{model.num_parameters():,} parameters, validation loss {val:.3f}"
    )


def main() -> int:
    # Two chains of one-thread trainings, one per core: the Shakespeare course model
    # in a second process, the assistant's base, tasks and translation models here.
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        course = pool.submit(shakespeare)
        start = time.perf_counter()
        assistant_base_model(progress=sys.stderr.isatty())
        _, val = assistant_base_history()
        print(
            f"assistant base model ready in {time.perf_counter() - start:.0f} s: "
            f"validation loss {val:.3f}"
        )
        builds = (("assistant", assistant_model), ("translator", translator_model))
        builds += (("chat", chat_model), ("reward model", course_reward_model))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
