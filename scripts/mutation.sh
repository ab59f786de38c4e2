#!/usr/bin/env bash
# Mutation score of the algorithm-core functions (issue #18): scripts/mutation.py, an AST mutation runner.
#
#   scripts/mutation.sh [--budget CPU_SECONDS] [TARGET ...]   # targets: darts genotype gdas proxyless parsec pcdarts
#                                                            #          merged_conv dropnas pdarts (default: all)
#
# Not part of the test run: each target's tests run once unmutated (recording which tests execute each core
# function), then every mutant of the target's core functions runs only those tests, with -x, in a forked child of
# one process that imported torch, Lightning and NNI once. One child at a time and OMP_NUM_THREADS=1 (a tiny, shared
# machine); --budget caps each target's mutant CPU time (default 300 s). Per-mutant lines and the summary go to
# $MUTATION_OUT (default: a new temporary folder). mutmut 3 was tried first: its coverage phase over the whole tree
# never finished on this machine, hence the runner.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export OMP_NUM_THREADS=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec python "$REPO/scripts/mutation.py" "$@"
