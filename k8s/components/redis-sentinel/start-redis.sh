#!/bin/sh
# Start this pod's redis-server: a replica of the primary the Sentinels name, or, when no
# Sentinel answers (the first start of the set), the primary itself on pod 0.
set -eu
domain=qwen-serve-redis-headless
self="$(hostname).$domain"
primary=""
for i in 0 1 2; do
  answer=$(redis-cli -h "qwen-serve-redis-$i.$domain" -p 26379 --no-auth-warning \
    -a "$REDIS_PASSWORD" sentinel get-master-addr-by-name qwen-serve 2>/dev/null | head -n 1) || true
  if [ -n "$answer" ]; then primary=$answer; break; fi
done
[ -n "$primary" ] || primary="qwen-serve-redis-0.$domain"
set -- /etc/redis/redis.conf --requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD" \
  --replica-announce-ip "$self"
if [ "$primary" != "$self" ]; then
  set -- "$@" --replicaof "$primary" 6379
fi
exec redis-server "$@"
