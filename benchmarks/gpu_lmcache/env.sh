# Source me on the device after .gpu-vllm/bin/env.sh (see benchmarks/gpu_lmcache/prepare.sh):
#   source .gpu-vllm/bin/env.sh && source benchmarks/gpu_lmcache/env.sh
# Installs what bin/stage.sh left in /tmp/lmc-stage into /tmp/site once (/tmp/site/.lmcache-ok):
# the wheels always; a fallback wheel only where its module does not import on this image; the
# numba stand-in only where numba does not import. Then checks that LMCache loads (its compiled
# ops included); a failure is printed in full and returns 1, the vLLM env stays as it was.
# LMC_SITE, LMC_STAGE and PYTHON change the paths and the interpreter (the CPU dry run uses them).
_lmc_site=${LMC_SITE:-/tmp/site}
_lmc_stage=${LMC_STAGE:-/tmp/lmc-stage}
_lmc_py=${PYTHON:-python3}
_lmc_install() {
  PYTHONPATH= "$_lmc_py" -m pip install -q --no-index --no-deps --no-compile --target "$_lmc_site" "$@" \
    >/tmp/pip-lmcache.log 2>&1 || { grep -v "^WARNING" /tmp/pip-lmcache.log; return 1; }
}
if [ ! -f "$_lmc_site/.lmcache-ok" ]; then
  if [ ! -d "$_lmc_stage/wheels" ]; then
    echo "lmcache env: nothing staged in $_lmc_stage: run bash .gpu-lmcache/bin/stage.sh (carry .gpu-lmcache) first"
    return 1
  fi
  _lmc_install "$_lmc_stage"/wheels/*.whl || return 1
  while read -r _mod _whl; do
    if ! PYTHONPATH="$_lmc_site:${PYTHONPATH:-}" "$_lmc_py" -c "import $_mod" 2>/dev/null; then
      echo "lmcache env: $_mod does not import here: installing $(basename "$_lmc_stage"/fallback/"$_whl"-*.whl)"
      _lmc_install "$_lmc_stage"/fallback/"$_whl"-*.whl || return 1
    fi
  done < "$_lmc_stage/fallback/MODULES"
  if ! PYTHONPATH="$_lmc_site:${PYTHONPATH:-}" "$_lmc_py" -c "from numba import njit" 2>/dev/null; then
    echo "lmcache env: numba does not import here: its stand-in (njit = identity) goes to $_lmc_site/numba"
    rm -rf "$_lmc_site/numba" && cp -r "$_lmc_stage/stubs/numba" "$_lmc_site/numba" || return 1
  fi
  touch "$_lmc_site/.lmcache-ok"
fi
export LMCACHE_TRACK_USAGE=false
if [ -z "${LMC_NO_CHECK:-}" ]; then
  "$_lmc_py" "$(dirname "${BASH_SOURCE[0]}")/phase.py" --check || return 1
fi
