"""A module that raises while it is imported (for ``test_process.py``).

``Mesh.spawn("broken_workers:main")`` must raise ``SpawnError`` carrying
this traceback, once."""

raise RuntimeError("broken_workers refuses to be imported (planted failure 8d1f)")
