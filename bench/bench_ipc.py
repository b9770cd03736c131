"""Round trip and one-way throughput of 64-byte messages, meshipc against its
peers: now part of the suite (``python -m bench``), kept as a shortcut for

    python -m bench --only rtt,throughput [more options of python -m bench]

(meshipc on the stock loop and on uvloop, ``meshipc.sync``, a service call,
``multiprocessing.Pipe``/``connection``, raw asyncio streams on both loops,
pyzmq, Pyro5, gRPC; see bench/run.py and bench/paths.py).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.run import main

    sys.exit(main(["--only", "rtt,throughput", *sys.argv[1:]]))
