"""meshipc's benchmark suite: meshipc against what users would use instead,
in the same run on the same machine. Run it with ``python -m bench`` (or
``python bench/run.py``); see ``bench/run.py`` for the options.

Not collected by pytest (``tests/test_bench_smoke.py`` runs a tiny part).
"""
