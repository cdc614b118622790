#!/usr/bin/env bash
# Start-up of `predict` on the GPU image with the bytecode kept in the cache folder (star_lightning.bytecode):
# the first run writes it, the second reads it, the third runs with it switched off (as every run did before).
source benchmarks/device_runs/setup.sh
OUTD=$OUT/bytecode; mkdir -p $OUTD
export STAR_LIGHTNING_CACHE=/tmp/slcache
python3 -m star_lightning generate --benchmark ruler --task niah_single_1 --length 1024 --num_samples 3 --output /tmp/bq.jsonl > $OUTD/gen.log 2>&1
run() {  # label, env...
  local label=$1; shift
  env "$@" /usr/bin/time -f "$label: wall %e s" python3 -m star_lightning predict --model.attention dense --data.path /tmp/bq.jsonl \
    --output /tmp/bp_$label.jsonl --trainer.accelerator gpu --trainer.devices 1 --trainer.logger.class_path lightning.pytorch.loggers.TensorBoardLogger \
    --trainer.logger.init_args.save_dir /tmp/bl --trainer.logger.init_args.name $label --trainer.enable_progress_bar false > $OUTD/$label.log 2>&1
  tail -1 $OUTD/$label.log
}
run first_writes
run second_reads
run switched_off STAR_LIGHTNING_BYTECODE_CACHE=0
find /tmp/slcache/pycache -name '*.pyc' | wc -l
python3 - <<'PY' > $OUTD/startup.txt 2>&1
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import glob
for label in ("first_writes", "second_reads", "switched_off"):
    for d in glob.glob(f"/tmp/bl/{label}/version_*"):
        acc = EventAccumulator(d); acc.Reload()
        tags = [t for t in acc.Tags()["scalars"] if t.startswith("startup/")]
        print(label, {t.removeprefix("startup/"): round(acc.Scalars(t)[0].value, 2) for t in sorted(tags)})
PY
cat $OUTD/startup.txt
