"""A module whose import never ends (for ``test_process.py``): a worker
started on it is stuck before it can start its function."""

import time

time.sleep(3600)
