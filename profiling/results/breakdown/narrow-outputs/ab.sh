# Alternating fresh processes, one core: the step as committed (base) and with narrow.diff applied.
# Run from the repository root: bash profiling/results/breakdown/narrow-outputs/ab.sh
D=profiling/results/breakdown/narrow-outputs
for i in 1 2; do
  taskset -c 0 python -m dtql_fast.profiling.breakdown --threads 1 --steps 30 --matmuls --json $D/base-$i.json
  git apply $D/narrow.diff
  taskset -c 0 python -m dtql_fast.profiling.breakdown --threads 1 --steps 30 --matmuls --json $D/narrow-$i.json
  git apply -R $D/narrow.diff
done
