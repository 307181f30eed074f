#!/bin/bash
# cold compile of a short Reacher run, C++ wrapper (default) vs Python wrapper, alternating, fresh caches
cd "$(dirname "$0")/../../../.."
for i in 1 2; do
  for w in 1 0; do
    rm -rf /tmp/cc_$w /tmp/ccrun_$w
    TORCHINDUCTOR_CPP_WRAPPER=$w TORCHINDUCTOR_CACHE_DIR=/tmp/cc_$w taskset -c 1 python -m dtql_fast.train --task dtql_fast/reacher/scripted-v0 --epochs 1 --steps-per-epoch 30 --pretrain-epochs 1 --eval-every 1 --eval-episodes 1 --compile --threads 1 --out /tmp/ccrun_$w > /tmp/cold_${w}_${i}.log 2>&1
    echo "cpp_wrapper=$w run $i: $(grep -o 'compiled the [a-z]* step in [0-9.]*s' /tmp/cold_${w}_${i}.log | tr '\n' ';')"
  done
done
