#!/bin/bash
# Incremental cow pauses: main's build (dirty log in the pause) against the
# branch's (dirty log turned on / harvested ahead of the pause), alternating.
set -u
out=/tmp/inc-compare; mkdir -p $out
for mem in 1G 4G; do
  data=768; [ $mem = 4G ] && data=3000
  for r in 3 4 5 6 7; do
    for v in main inc; do
      b=/work/main/target/release/cevm-bench; [ $v = inc ] && b=/work/inc-target/release/cevm-bench
      echo "== $mem $v round $r $(date +%T)"
      $b incremental --mem $mem --data-mib $data --n 5 --strategy cow --dir /work/bench-inc-$v --json $out/$mem-$v-$r.json 2>&1 | tail -12
    done
  done
done
echo DONE
