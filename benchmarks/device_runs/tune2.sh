#!/usr/bin/env bash
# tune at 0.86 on Qwen2.5-Coder-0.5B 16K for 4 hosts of an H100 (dense + the two question-in-anchor candidates), then
# predict --config with the written config on 5 of the requests.
source benchmarks/device_runs/setup.sh
OUTD=$OUT/tune; mkdir -p $OUTD
M=/tmp/m/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
/usr/bin/time -f "tune wall %e s" timeout 330 python3 -m star_lightning tune --model.pretrained $M \
  --ruler niah_multikey_1,niah_multikey_2,niah_single_3 --length 16384 --target 0.86 --samples 100 \
  --candidates aq_L/4 aq_L/8 --gpu H100 --trainer.devices 4 --trainer.strategy.context_parallel_size 4 \
  --device cuda --output $OUTD/tuned.yaml --work /tmp/tunew > $OUTD/tune.log 2>&1
echo "tune rc $?"; tail -25 $OUTD/tune.log; cat $OUTD/tuned.yaml
REQ=$(ls /tmp/tunew/*.jsonl 2>/dev/null | grep -v pred | head -1); echo "requests: $REQ"
if [ -f $OUTD/tuned.yaml ] && [ -n "$REQ" ]; then
  head -5 $REQ > /tmp/req5.jsonl
  /usr/bin/time -f "predict wall %e s" timeout 200 python3 -m star_lightning predict --config $OUTD/tuned.yaml --data.path /tmp/req5.jsonl \
    --output $OUTD/pred5.jsonl --trainer.accelerator gpu --trainer.devices 1 > $OUTD/predict.log 2>&1
  echo "predict rc $?"; tail -8 $OUTD/predict.log
  python3 -m star_lightning score $OUTD/pred5.jsonl 2>&1 | tail -5
fi
ls -la /tmp/tunew | head
