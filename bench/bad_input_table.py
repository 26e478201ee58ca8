"""The bad-input catalogue as a markdown table: runs every case of tests/integration/test_bad_inputs.py
through the same harness and prints input, expected and observed outcome (for docs/reliability.md).

    python bench/bad_input_table.py > /tmp/table.md      # exit status 1 if any case breaks the rule
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

from test_bad_inputs import CASES, harness, run_case  # noqa: E402


def cell(text: str, limit: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main() -> int:
    broken = 0
    print("| # | surface | input | expected | observed | index unchanged |")
    print("|---|---|---|---|---|---|")
    with harness() as h:
        for n, case in enumerate(CASES, start=1):
            observed, unchanged = run_case(h, case)
            ok = observed.startswith(case.expected) and (unchanged or case.changes_index)
            broken += not ok
            kept = "n/a (adds)" if case.changes_index else ("yes" if unchanged else "**NO**")
            mark = "" if ok else " **FAILS THE RULE**"
            print(
                f"| {n} | {case.surface} | {cell(case.input)} | {cell(case.expected)} | "
                f"{cell(observed)}{mark} | {kept} |"
            )
    print(f"\n{len(CASES)} cases, {broken} breaking the rule.")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
