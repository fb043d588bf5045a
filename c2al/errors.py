"""User-facing errors.

Anything a user can cause (a bad file, an unknown column, a wrong flag) raises
`C2ALError` with a one-line message naming the culprit. `train.py` prints it
without a traceback and exits non-zero.
"""


class C2ALError(ValueError):
    """A problem with the user's input, config, data or checkpoint."""
