#!/bin/bash
# Direct path: process-based migration of a dirtier with and without a NIC; dest restore ms.
BIN=${BIN:-/work/main/target/release/cevm}
D=/tmp/nx; cd $D
ip link show dtap0 >/dev/null 2>&1 || { ip tuntap add dev dtap0 mode tap; ip tuntap add dev dtap1 mode tap; ip link set dtap0 up; ip link set dtap1 up; }
for i in $(seq 1 ${N:-6}); do for nic in yes no; do
  rm -f s.sock d.sock d.in
  if [ $nic = yes ]; then SN="--net tap=dtap0"; DN="--net tap=dtap1"; else SN=; DN=; fi
  $BIN run --guest dirtier --mem 64M $SN --api-sock s.sock > s.out 2> s.err &
  sp=$!
  $BIN run --incoming unix:$D/d.in $DN --api-sock d.sock > d.out 2> d.err &
  dp=$!
  while [ ! -S s.sock ] || [ ! -S d.in ]; do sleep 0.05; done; sleep 1
  r=$(curl -s --unix-socket s.sock -X PUT -H 'Content-Type: application/json' -d "{\"to\":\"unix:$D/d.in\"}" http://x/v1/migrate)
  echo "$nic $(echo "$r" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("downtime %.2f restore %.2f decode %.2f rt %.2f state %.2f" % (r["downtime_ms"], r["dest_restore_ms"], r["dest_state_decode_ms"], r["switch_round_trip_ms"], r["switch"]["state_ms"]))' 2>&1 || echo "$r")"
  sleep 0.5
  kill $dp $sp 2>/dev/null; wait $dp $sp 2>/dev/null
done; done
