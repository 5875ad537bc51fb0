#!/usr/bin/env bash
# Mutation testing of the attack, defense and metric code (mutmut, configured in
# pyproject.toml [tool.mutmut]): every small change mutmut makes to
#   pipeline/attacks/{pgd,patch,mask_fgsm,masked_pgd,robustness_map}.py, pipeline/attacks/patch_losses/{advp,lavan}.py,
#   pipeline/defenses/fnc.py, pipeline/metrics.py
# is run against the fast unit tests of those modules (tests/test_{pgd,patch,mask_fgsm,
# masked_pgd,fnc,metrics,adversarial_training,art_reference}.py, never the e2e runs), and
# a mutant is "killed" when some test fails. Prints killed / total and the percentage per
# module and overall, then the surviving mutants (see docs/mutation-survivors.md for why
# each survivor is equivalent or not worth a test).
#
#   bash scripts/mutation_test.sh            # a fresh run (about 40 minutes on 2 busy cores)
#   KEEP=1 bash scripts/mutation_test.sh     # reuse mutants/ from the last run (only what changed reruns)
#   SCORE_ONLY=1 bash scripts/mutation_test.sh   # print the score of the last run, run nothing
#   bash scripts/mutation_test.sh NAME...    # (re)check these mutants only, keeping the other results
#                                            # (e.g. the survivors, after adding tests)
#   mutmut show <name>                       # the diff of one mutant
#
# Needs the dev extra (pip install -e '.[dev]'). Exits 1 when the overall score is under
# MIN_SCORE percent (default 80).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [[ -z "${SCORE_ONLY:-}" ]]; then
    [[ -n "${KEEP:-}" || $# -gt 0 ]] || rm -rf mutants
    mkdir -p mutants
    start=$(date +%s)
    # one torch thread per mutant run (--max-children of them in parallel, default: the cores),
    # so that the CPU-time limit of a run measures its tests, not its thread count
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n "${NICE:-10}" "$PY" -m mutmut run \
        --max-children "${MAX_CHILDREN:-$(nproc)}" "$@" >mutants/run.log 2>&1 || {
        tail -c 3000 mutants/run.log | tr '\r' '\n' | tail -30; echo "mutmut run failed (log: mutants/run.log)"; exit 2; }
    echo "mutmut run: $(( $(date +%s) - start )) s (log: mutants/run.log)"
fi
"$PY" - "${MIN_SCORE:-80}" <<'PYEOF'
"""Score per module from mutmut's result files (mutants/<module>.meta)."""
import json
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

modules = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout"}
rows, survivors, total_k, total_n, total_u = [], [], 0, 0, 0
for module in modules:
    meta = Path("mutants") / (module + ".meta")
    if not meta.is_file():
        sys.exit(f"{meta} not found: run scripts/mutation_test.sh first")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    killed = sum(code in KILLED for code in codes.values())
    unchecked = sum(code is None for code in codes.values())  # an interrupted run: KEEP=1 finishes it
    checked = len(codes) - unchecked
    survivors += [(k, "survived" if code == 0 else "no tests" if code in (5, 33) else f"exit {code}")
                  for k, code in sorted(codes.items()) if code is not None and code not in KILLED]
    rows.append((module, killed, checked, unchecked))
    total_k, total_n, total_u = total_k + killed, total_n + checked, total_u + unchecked
width = max(len(m) for m in modules)
print(f"\n{'module':<{width}}  killed / total   score   (not checked)")
for module, k, n, u in rows:
    print(f"{module:<{width}}  {k:>6} / {n:<6}  {100 * k / max(n, 1):5.1f} %" + (f"   ({u})" if u else ""))
score = 100 * total_k / max(total_n, 1)
print(f"{'overall':<{width}}  {total_k:>6} / {total_n:<6}  {score:5.1f} %" + (f"   ({total_u})" if total_u else ""))
if total_u:
    print(f"PARTIAL: {total_u} mutants not checked yet (interrupted run); `KEEP=1 bash scripts/mutation_test.sh` "
          "checks them and keeps the rest")
print(f"\nsurviving mutants ({len(survivors)}; `mutmut show <name>` prints one):")
for name, status in survivors:
    print(f"  {name}: {status}")
sys.exit(3 if total_u else 0 if score >= float(sys.argv[1]) else 1)
PYEOF
