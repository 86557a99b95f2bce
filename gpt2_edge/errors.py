"""The one base type of the package's refusals.

Every error that gpt2-edge raises because of what a user asked for (a bad option, a file that is
not a bundle, a prompt that does not fit, a GPU library that is missing) is a ``Gpt2EdgeError``:
its message is the whole story (what is wrong, and what to do), so the CLI prints it as one line
and exits 2, and the server answers it as a 4xx. Anything else that escapes is a bug and keeps
its traceback.

It subclasses ``ValueError`` so that code written against the earlier ``ValueError`` refusals
still catches them.
"""

from __future__ import annotations


class Gpt2EdgeError(ValueError):
    """A refusal: the input or the environment is not what gpt2-edge can work with."""


class Gpt2EdgeTypeError(Gpt2EdgeError, TypeError):
    """A refusal of an argument of the wrong type (also a ``TypeError``)."""
