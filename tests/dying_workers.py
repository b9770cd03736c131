"""A module whose import ends the process at once, with status 7, before
the worker can report anything (for ``test_process.py``)."""

import os

os._exit(7)
