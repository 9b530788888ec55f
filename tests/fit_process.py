"""`python -m nirvana_lightning fit` in a fresh process, as a user runs it (multi-process strategies need one)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_fit(config: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the CLI with ``config``; the test helpers in tests/ (rank_record, kill_after) are importable."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config", str(config), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_fits(*runs: tuple, timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """Several independent ``run_fit(config, *extra)`` at once (``runs``: ``(config, *extra)`` tuples): the
    machine has 2 cores and most of a tiny run is its interpreter start-up, so a pair takes the time of one."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "nirvana_lightning", "fit", "--config", str(config), *extra],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for config, *extra in runs]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


def rank_records(directory: Path, n: int = 2) -> list[dict]:
    """What ``rank_record.RecordRankState`` / ``RecordShardedState`` wrote for each rank."""
    return [json.loads((directory / f"rank{i}.json").read_text()) for i in range(n)]
