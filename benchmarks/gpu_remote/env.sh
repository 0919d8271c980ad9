# Source on the GPU machine after `bash .gpu-remote/bin/stage.sh` (see prepare.sh beside this file):
# Mooncake's package and binaries, redis-server and their libraries from /tmp/remote.
if ! PYTHONPATH=/tmp/site python3 -c "import redis, hiredis" 2>/dev/null; then
  source .gpu-vllm/bin/env.sh || return 1  # redis-py and hiredis come with the vLLM kit's wheels
fi
export PYTHONPATH=/tmp/remote/site:/tmp/site:$PWD PYTHONUNBUFFERED=1
# Only the libraries this machine lacks (its own libssl, libz... stay in use).
rm -rf /tmp/remote/need && mkdir -p /tmp/remote/need
have=$(ldconfig -p | awk 'NR > 1 {print $1}')  # the sonames this machine's loader knows
for f in /tmp/remote/lib/*; do
  n=$(basename "$f")
  grep -qxF "$n" <<< "$have" || ln -s "$f" "/tmp/remote/need/$n"
done
echo "gpu_remote: libraries taken from the kit: $(ls /tmp/remote/need | tr '\n' ' ')"
export LD_LIBRARY_PATH=/tmp/remote/need${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=/tmp/remote/bin:$PATH
python3 -c "from mooncake import store; import redis; print('mooncake', store.__file__, 'redis-py', redis.__version__)" \
  && redis-server --version
