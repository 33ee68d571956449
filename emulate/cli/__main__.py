"""`python -m emulate.cli`: the `emulate` executable (cluster/jobs.py starts a job's run this way)."""
from emulate.cli.program import entry

if __name__ == "__main__":
    entry()
