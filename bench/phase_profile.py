"""Seconds and peak RSS of each phase of one `layerprune` run, read from its own progress output.

The run is a child process; its stderr (progress bars and log lines) says which phase it is in,
and its resident memory is sampled every 0.2 s from /proc. Each stretch of one phase becomes a
row: what a run's phases cost, in order, from one invocation (scoring, healing, evaluation,
...), with the whole run's wall seconds and the kernel's peak RSS beside them.

    python bench/phase_profile.py -- layerprune prune --target-layers 28 --out runs/main
    python bench/phase_profile.py --json runs/phases.json -- layerprune prune --model embedded:gemma3-270m ...
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import threading
import time

# (pattern in a progress-bar description or log line, phase); the first that matches wins.
# The log says when an iteration's last phase (its held-out evaluation) ends: "iteration N/M: removed".
PHASES = [
    (r"^Loading weights|GGUF: reading", "loading"),
    (r"^data |^checking the training text", "inputs"),
    (r"layers, removing \d+ \(", "shortlist"),
    (r"^fitting the patch", "patch fit"),
    (r"^scoring layers", "scoring"),
    (r"^healing \(iteration|^healing iteration \d+: \d+ (steps on|local|global)", "healing"),
    (r"^healing iteration \d+: (validation KL|healing could not)", "evaluation"),   # healing has ended
    (r"^iteration \d+/\d+: removed", "shortlist"),
    (r"^final evaluation", "final suite"),
    (r"^speed", "speed"),
    (r"^writing the result|^GGUF: |^wrote |^Writing model shards", "writing"),
]
PER_ITERATION = ("shortlist", "patch fit", "scoring", "healing", "evaluation")


def phase_of(line: str) -> str | None:
    for pattern, phase in PHASES:
        if re.search(pattern, line.strip()):
            return phase
    return None


def rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for row in status:
                if row.startswith("VmRSS:"):
                    return int(row.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")

    started = time.perf_counter()
    child = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=sys.stdout)
    rows: list[dict] = [{"phase": "start", "seconds": 0.0, "peak_rss_gb": 0.0, "began": 0.0}]
    lock = threading.Lock()

    def sample() -> None:
        while child.poll() is None:
            gb = rss_gb(child.pid)
            with lock:
                rows[-1]["peak_rss_gb"] = max(rows[-1]["peak_rss_gb"], gb)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    buffer = b""
    done = 0   # iterations whose "iteration N/M: removed" line has been seen
    while True:
        chunk = child.stderr.read1(4096)
        if not chunk:
            break
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        buffer += chunk
        *lines, buffer = re.split(rb"[\r\n]", buffer)
        for raw in lines:
            line = raw.decode(errors="replace")
            phase = phase_of(line)
            if phase is None:
                continue
            ended = re.match(r"^iteration (\d+)/(\d+): removed", line.strip())
            if ended:
                done += 1
                phase = "shortlist" if ended.group(1) != ended.group(2) else "final suite"
            label = f"{phase} {done + 1}" if phase in PER_ITERATION else phase
            with lock:
                if rows[-1]["phase"] != label:
                    now = time.perf_counter() - started
                    rows[-1]["seconds"] = now - rows[-1]["began"]
                    rows.append({"phase": label, "seconds": 0.0, "peak_rss_gb": rss_gb(child.pid), "began": now})
    code = child.wait()
    total = time.perf_counter() - started
    rows[-1]["seconds"] = total - rows[-1]["began"]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"\n{'phase':<22} {'seconds':>9} {'peak RSS GB':>12}")
    for row in rows:
        print(f"{row['phase']:<22} {row['seconds']:>9.1f} {row['peak_rss_gb']:>12.2f}")
    print(f"{'whole run':<22} {total:>9.1f} {peak:>12.2f}   (exit {code}; peak: the kernel's ru_maxrss)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "exit": code, "seconds": total, "peak_rss_gb": peak,
                       "phases": [{k: v for k, v in row.items() if k != "began"} for row in rows]}, out, indent=1)
    sys.exit(code)


if __name__ == "__main__":
    main()
