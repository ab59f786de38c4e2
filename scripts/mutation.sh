#!/usr/bin/env bash
# Mutation score of the algorithm-core functions (issue #18), with mutmut 3, on a throw-away copy of the tree.
#
#   scripts/mutation.sh [GLOB ...]      # default: every function listed in FUNCTIONS below
#
# Not part of the test run: it takes tens of minutes on two cores. Each mutant runs only the tests that call the
# mutated function (mutmut's coverage stats), from the per-variant test files below, with -x. The per-file summary
# (killed / survived / other) is printed at the end and written to $OUT/mutation-summary.txt; `mutmut show NAME` in
# $WORK shows a mutant's diff. OMP_NUM_THREADS=1 and one child at a time (a tiny, shared machine).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${MUTATION_WORKDIR:-$(mktemp -d /tmp/mutation.XXXXXX)}"
OUT="${MUTATION_OUT:-$WORK}"
export OMP_NUM_THREADS=1

# The algorithm cores: mutmut names them module.x_function or module.xǁClassǁmethod.
S=nni_darts_variants.strategies
FUNCTIONS=(
  "$S.darts.x_virtual_step__mutmut_*"                                   # DARTS virtual step
  "$S.darts.xǁDartsLightningǁunrolled_arch_gradients__mutmut_*"         # DARTS second order
  "$S.darts.xǁDartsLightningǁfinite_difference_hvp__mutmut_*"           # DARTS HVP
  "nni_darts_variants.genotype.x_darts_rule__mutmut_*"                  # the DARTS rule
  "$S.gdas.xǁGumbelMaxEdgeǁ*__mutmut_*" "$S.gdas.x_gumbel_noise__mutmut_*"  # GDAS sampling
  "$S.proxyless.x_gate_to_alpha_gradient__mutmut_*" "$S.proxyless.x_rescale_sampled_alphas__mutmut_*"
  "$S.proxyless.xǁProxylessEdgeǁ*__mutmut_*"                            # ProxylessNAS binary gates
  "$S.parsec.x_importance_weights__mutmut_*" "$S.parsec.x_importance_weighted_backward__mutmut_*"
  "$S.parsec.xǁParsecLightningǁcompute_arch_gradients__mutmut_*" "$S.parsec.xǁParsecLightningǁ_sample_loss__mutmut_*"
  "$S.pcdarts.x_channel_shuffle__mutmut_*" "$S.pcdarts.xǁPartialChannelEdgeǁforward__mutmut_*"
  "$S.pcdarts.xǁEdgeNormalizedNodeǁ*__mutmut_*" "$S.pcdarts.xǁPCDartsLightningǁedge_weights__mutmut_*"
  "nni_darts_variants.merged_conv.*__mutmut_*"                          # MergeNAS masks and merged kernel
  "$S.dropnas.x_sample_group_mask__mutmut_*" "$S.dropnas.x_kept_share__mutmut_*"
  "$S.dropnas.x_adjust_kept_alphas__mutmut_*" "$S.dropnas.x_partial_decay_loss__mutmut_*"
  "$S.pdarts.x_drop_operations__mutmut_*" "$S.pdarts.x_limit_skip_connections__mutmut_*"
)
[ "$#" -gt 0 ] && FUNCTIONS=("$@")

# the working tree's files that git knows or would add (tracked and untracked, not ignored)
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard) | (cd "$REPO" && xargs -0 cp --parents -t "$WORK")
cd "$WORK"
cat > setup.cfg <<'CFG'
[mutmut]
source_paths = nni_darts_variants/
only_mutate =
    nni_darts_variants/strategies/*
    nni_darts_variants/genotype.py
    nni_darts_variants/merged_conv.py
also_copy = search_spaces/
mutate_only_covered_lines = true
pytest_add_cli_args =
    -x
    -q
    -p
    no:cacheprovider
    -m
    not slow
pytest_add_cli_args_test_selection =
    tests/strategies/test_darts.py
    tests/strategies/test_gdas.py
    tests/strategies/test_proxyless.py
    tests/strategies/test_parsec.py
    tests/strategies/test_pcdarts.py
    tests/strategies/test_mergenas.py
    tests/strategies/test_merged_conv.py
    tests/strategies/test_dropnas.py
    tests/strategies/test_pdarts.py
    tests/test_genotype_registry.py
CFG
# pyproject.toml has no [tool.mutmut]; mutmut then reads setup.cfg
python -m mutmut run --max-children 1 "${FUNCTIONS[@]}" || true
python -m mutmut results --all true > mutation-results.txt 2>&1 || true
python - "$OUT/mutation-summary.txt" <<'PY'
import collections, re, sys
counts = collections.defaultdict(collections.Counter)
for line in open('mutation-results.txt'):
    m = re.match(r'\s*([\w.]+?)\.x[ǁ_].*?__mutmut_\d+: (.+)$', line)
    if m:
        counts[m.group(1)][m.group(2).strip()] += 1
lines = [f'{module}: ' + ', '.join(f'{k} {v}' for k, v in sorted(c.items())) for module, c in sorted(counts.items())]
open(sys.argv[1], 'w').write('\n'.join(lines) + '\n')
print('\n'.join(lines))
PY
echo "work dir: $WORK"
