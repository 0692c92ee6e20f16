#!/bin/bash
BIN=${BIN:-/work/main/target/release/cevm}
D=/tmp/nx; cd $D
for nic in yes no; do
  rm -f s.sock
  if [ $nic = yes ]; then SN="--net tap=dtap0"; else SN=; fi
  $BIN run --guest dirtier --mem 64M $SN --api-sock s.sock > s.out 2> s.err &
  sp=$!
  while [ ! -S s.sock ]; do sleep 0.05; done; sleep 1
  for i in $(seq 1 ${N:-8}); do
    r=$(curl -s --unix-socket s.sock -X PUT -H 'Content-Type: application/json' -d '{"to":"local"}' http://x/v1/migrate)
    echo "$nic $(echo "$r" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.2f %.2f" % (r["downtime_ms"], r["dest_restore_ms"]))')"
    sleep 0.3
  done
  kill $sp; wait $sp 2>/dev/null
done
