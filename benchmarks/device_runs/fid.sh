#!/usr/bin/env bash
# fid.sh CONFIGS...: Qwen2.5-Coder-0.5B 16K fidelity table, 100 a task, the three tasks; work kept in /tmp/fw (warm machine)
source benchmarks/device_runs/setup.sh
mkdir -p $OUT/fid
timeout ${FID_TIMEOUT:-570} python3 scripts/fidelity_table.py --model /tmp/m/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --device cuda --decode graph \
  --lengths 16384 --num-samples 100 --tasks niah_multikey_1 niah_multikey_2 niah_single_3 --configs "$@" \
  --work /tmp/fw --out $OUT/fid/fidelity_qwen05b_16k > $OUT/fid/log_$(date +%s).txt 2>&1
echo rc $?
tail -25 $OUT/fid/log_*.txt
cat $OUT/fid/fidelity_qwen05b_16k.md 2>/dev/null
(cd /tmp/fw && find . -name '*.jsonl' -path '*pred*' | head -50; du -sh .)
tar czf $OUT/fid/fw_preds.tgz -C /tmp/fw $(cd /tmp/fw && find . -name 'manifest.json' -o -name '*pred*' | grep -v requests) 2>/dev/null; ls -la $OUT/fid
