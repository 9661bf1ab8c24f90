#!/usr/bin/env bash
# Scaling of the distributed sine example on this machine: 1 process vs 2 processes (gloo),
# global meta-batch of 50 tasks, S=5, second order. Prints the median iteration time of each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ITERS=${ITERS:-60}
median() { "$PY" -c "import json,sys,statistics; v=[json.loads(l)['ms'] for l in open(sys.argv[1])][5:]; print(f'{statistics.median(v):.3f}')" "$1"; }
for threads in 1 2; do
  "$PY" examples/distributed_sine.py --tasks 50 --iterations "$ITERS" --threads "$threads" > /tmp/fm_one_$threads.jsonl
  echo "1 process, $threads thread(s): $(median /tmp/fm_one_$threads.jsonl) ms/iteration"
done
"$(dirname "$PY")/torchrun" --nproc_per_node=2 --master_port "${PORT:-29571}" examples/distributed_sine.py \
  --tasks 50 --iterations "$ITERS" --threads 1 > /tmp/fm_two.jsonl 2>/dev/null
echo "2 processes (gloo), 1 thread each: $(median /tmp/fm_two.jsonl) ms/iteration"
"$PY" -c "
import json
a=[json.loads(l)['loss'] for l in open('/tmp/fm_one_1.jsonl')]; b=[json.loads(l)['loss'] for l in open('/tmp/fm_two.jsonl')]
print(f'loss curves: max relative difference {max(abs(x-y)/abs(x) for x,y in zip(a,b)):.2e} over {len(a)} iterations (float32)')"
