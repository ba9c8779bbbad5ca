#!/bin/sh
# Start this pod's Sentinel, monitoring the primary the other Sentinels name (pod 0 on the
# first start). Sentinel rewrites its configuration, so it lives in a writable emptyDir.
set -eu
domain=qwen-serve-redis-headless
self="$(hostname).$domain"
primary=""
for i in 0 1 2; do
  peer="qwen-serve-redis-$i.$domain"
  [ "$peer" = "$self" ] && continue
  answer=$(redis-cli -h "$peer" -p 26379 --no-auth-warning -a "$REDIS_PASSWORD" \
    sentinel get-master-addr-by-name qwen-serve 2>/dev/null | head -n 1) || true
  if [ -n "$answer" ]; then primary=$answer; break; fi
done
[ -n "$primary" ] || primary="qwen-serve-redis-0.$domain"
conf=/sentinel/sentinel.conf
cat > "$conf" <<CONF
port 26379
dir /sentinel
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $self
requirepass $REDIS_PASSWORD
sentinel sentinel-pass $REDIS_PASSWORD
sentinel monitor qwen-serve $primary 6379 2
sentinel auth-pass qwen-serve $REDIS_PASSWORD
sentinel down-after-milliseconds qwen-serve 5000
sentinel failover-timeout qwen-serve 60000
sentinel parallel-syncs qwen-serve 1
CONF
exec redis-server "$conf" --sentinel
