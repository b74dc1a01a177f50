"""Self-checking exercises, one module per chapter.

from minigpt.exercises import ch00
ch00.q1.check(my_function)   # correct / not attempted / incorrect: why
ch00.q1.hint()
ch00.q1.solution()
"""

from minigpt.exercises.core import Blank, CheckResult, Incorrect, NotAttempted, Question, blank

__all__ = ["Blank", "CheckResult", "Incorrect", "NotAttempted", "Question", "blank"]
