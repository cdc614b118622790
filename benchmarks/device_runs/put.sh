#!/usr/bin/env bash
# put.sh NAME: keep the carried part(s) .stage/NAME.gguf.partNN in /tmp/m/NAME.d/ (idempotent per part)
set -e
mkdir -p /tmp/m/$1.d
for f in .stage/$1.gguf.part*; do cp "$f" /tmp/m/$1.d/; done
ls /tmp/m/$1.d | wc -l; du -sb /tmp/m/$1.d
