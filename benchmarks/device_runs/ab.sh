#!/usr/bin/env bash
# Issue 26 diagnosis: (1) imports with/without a bytecode cache; (2) dense vs star Phase 1 with fused projections on/off
# (random weights, real shapes); (3) the Llama-3.1-8B shape's decode against its floor.
source benchmarks/device_runs/setup.sh
set -x
OUTD=$OUT/ab; mkdir -p $OUTD
{
python3 - <<'PY'
import os, sys, torch, transformers, lightning
for mod in (torch, transformers, lightning):
    d = os.path.dirname(mod.__file__)
    pyc = sum(1 for r, _, fs in os.walk(d) for f in fs if f.endswith(".pyc"))
    py = sum(1 for r, _, fs in os.walk(d) for f in fs if f.endswith(".py"))
    print(mod.__name__, mod.__version__, d, "writable", os.access(d, os.W_OK), "py", py, "pyc", pyc)
print("sys.flags.dont_write_bytecode", sys.flags.dont_write_bytecode, "PYTHONDONTWRITEBYTECODE", os.environ.get("PYTHONDONTWRITEBYTECODE"), "prefix", sys.pycache_prefix)
PY
IMP="import star_lightning.predict_cli, star_lightning.module, lightning.pytorch, transformers, torchmetrics"
env | grep -i -E "PYTHONDONTWRITE|PYCACHE" || true
for i in 1 2; do /usr/bin/time -f "as is, run $i: %e s" python3 -c "$IMP"; done
for i in 1 2; do env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=/tmp/pyc /usr/bin/time -f "bytecode written to a prefix, run $i: %e s" python3 -c "$IMP"; done
env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=/tmp/pyc python3 -X importtime -c "$IMP" 2> $OUTD/imp_prefix.txt
python3 -X importtime -c "$IMP" 2> $OUTD/imp_plain.txt
find /tmp/pyc -name '*.pyc' | wc -l
} > $OUTD/imports.txt 2>&1
cat $OUTD/imports.txt
# (2) profiles, random weights
for shape in qwen2.5-0.5b gemma-3-270m; do
  timeout 150 python3 scripts/profile_request.py --shape $shape --length 8192 --block-size 2048 --attention star dense --prefill graph --requests 5 --new-tokens 16 --out $OUTD/prof_${shape}_fused > $OUTD/prof_${shape}_fused.log 2>&1
  PYTHONPATH=$PWD/benchmarks/device_runs/fpoff:$PYTHONPATH timeout 150 python3 scripts/profile_request.py --shape $shape --length 8192 --block-size 2048 --attention star dense --prefill graph --requests 5 --new-tokens 16 --out $OUTD/prof_${shape}_unfused > $OUTD/prof_${shape}_unfused.log 2>&1
  tail -n 5 $OUTD/prof_${shape}_fused.log $OUTD/prof_${shape}_unfused.log
done
# (3) Llama-3.1-8B shape, one host's share of 128K/4: decode against its floor (fused projections now on)
timeout 200 python3 scripts/profile_request.py --shape llama-3.1-8b --length 32768 --block-size 32768 --attention star --prefill eager --requests 3 --new-tokens 128 --out $OUTD/llama8b_32k > $OUTD/llama8b.log 2>&1
tail -3 $OUTD/llama8b.log
nvidia-smi --query-gpu=name --format=csv
