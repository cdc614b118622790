#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B 8K through the CLI: dense and star, as shipped, without the tokenizing worker (nw0) and with the
# flash kernel for every long call (flash: cuDNN took 50 ms of CPU in a dense 8K request of the profile, a graph
# built for each new length?)
source benchmarks/device_runs/setup.sh
OUTD=$OUT/cli; mkdir -p $OUTD
M=/tmp/m/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
timeout 300 python3 scripts/cli_throughput.py --model qwen2.5-coder-0.5b=$M --lengths 8192 --attention dense star --requests 20 --variant 'nw0=--data.num_workers 0' --variant 'flash=--model.backend sdpa' --work-dir /tmp/cliw --out $OUTD/cli_qwen.json > $OUTD/cli_qwen.log 2>&1
tail -20 $OUTD/cli_qwen.log
python3 - <<'PY'
import json, os
for f in ("cli_qwen.json",):
    p = os.path.join(os.environ["OUT"], "cli", f)
    if os.path.exists(p):
        for r in json.load(open(p)).get("records", []):
            print(f, {k: r.get(k) for k in ("attention", "variant", "per_request_s", "phase1_s", "decode_ms_per_token", "startup_s", "startup_parts", "gpu")})
PY
