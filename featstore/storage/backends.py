"""The storage backends' former module path, kept for code written against it; import from
:mod:`featstore.storage` instead."""

from featstore.storage import *  # noqa: F401,F403
from featstore.storage import __all__  # noqa: F401
