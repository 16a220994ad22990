"""Summary of a fuzz campaign's log (tests/test_fuzz.py with FUZZ_LOG=<file>).

    FUZZ_LOG=fuzz.jsonl HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_fuzz.py -p no:cacheprovider
    python benchmarks/fuzz_summary.py fuzz.jsonl

Prints the number of mutants, their exit codes, how many the float64 oracle could predict,
the slowest mutant, the peak RSS and every problem found (exit 1, a hang, memory above 2 GB,
a wrong number at exit 0, a refusal without one line naming the file).
"""

from __future__ import annotations

import collections
import json
import re
import sys


def mutation_kind(description: str) -> str:
    """"config:<field>", "tensors:<kind>", "bytes:<kind>" or "seed" from a mutant's description
    ("<seed> <family> {mutation}" as tests/test_fuzz.py logs it)."""
    parts = description.split(" ", 2)
    if parts[0] == "seed" or len(parts) < 3:
        return "seed"
    family, rest = parts[1], parts[2]
    found = re.search(r"'field': '(\w+)'" if family == "config" else r"'kind': '(\w+)'", rest)
    return f"{family}:{found.group(1) if found else '?'}"


def main(path: str) -> int:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    exits = collections.Counter(code for row in rows for code in row["exit"][:1])
    seeds = collections.Counter(row["mutant"].split(" ")[0] for row in rows)
    problems = [row for row in rows if row["problems"]]
    slowest = max(rows, key=lambda row: row["seconds"])
    print(f"mutants: {len(rows)}")
    print(f"exit codes (JSON run): {dict(sorted(exits.items()))}")
    print(f"exit 0 checked against the float64 oracle: {sum(r['oracle'] and r['exit'][0] == 0 for r in rows)}; "
          f"self-consistency only: {sum(not r['oracle'] and r['exit'][0] == 0 for r in rows)}")
    print(f"by seed: {dict(seeds)}")
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        outcome = "problem" if row["problems"] else (
            "exit 0 = oracle" if row["oracle"] and row["exit"][0] == 0 else
            "exit 0 self-consistent" if row["exit"][0] == 0 else f"exit {row['exit'][0]}")
        kinds[mutation_kind(row["mutant"])][outcome] += 1
    print("by mutation kind:")
    for kind, outcomes in sorted(kinds.items()):
        print(f"  {kind}: {sum(outcomes.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()))})")
    print(f"slowest mutant: {slowest['seconds']:.2f} s; peak RSS: {max(r['peak_rss_mb'] for r in rows)} MB")
    print(f"problems: {len(problems)}")
    for row in problems:
        print(f"  {row['mutant'][:300]}: {row['problems']}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
