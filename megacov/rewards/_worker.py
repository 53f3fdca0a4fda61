"""Entry point of a reward worker process: ``python -m megacov.rewards._worker SPEC FD``."""
import sys
from multiprocessing.connection import Connection

from megacov.rewards.pool import serve

if __name__ == "__main__":
    serve(Connection(int(sys.argv[2])), sys.argv[1])
