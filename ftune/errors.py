"""The one exception type the CLI turns into a clear message and a non-zero exit.

Anything a user can cause (a bad recipe, a missing file, a broken row, an adapter for
another model) is raised as `FtuneError` with the place it happened; the CLI prints it
without a traceback. Anything else is a bug in ftune and keeps its traceback.
"""

from __future__ import annotations


class FtuneError(Exception):
    """A problem with the user's input or environment, with where it was found."""

    exit_code = 1

    def __init__(self, message: str, *, place: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.place = place
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.place}: {self.message}" if self.place else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class RecipeError(FtuneError):
    """One or more problems in a recipe; each problem is one line of the message."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        self.source = source
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{source}: {count}\n" + "\n".join(f"  {p}" for p in problems))

    def __str__(self) -> str:
        return self.message
