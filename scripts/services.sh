#!/usr/bin/env bash
# Starts the local services the tests talk to (PostgreSQL, MariaDB, Redis,
# RabbitMQ, NATS with JetStream) if one is not answering, with the commands
# this machine kind documents, then waits until each answers.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  local name=$1 port=$2; shift 2
  if up "$port"; then return 0; fi
  echo "services: starting $name" >&2
  "$@" >/dev/null 2>&1 || echo "services: '$*' failed" >&2
}

start postgresql 5432 bash -c 'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'
start mariadb 3306 start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
start redis 6379 redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
start rabbitmq 5672 rabbitmq-server -detached
start nats 4222 start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log

failed=0
for svc in postgresql:5432 mariadb:3306 redis:6379 rabbitmq:5672 nats:4222; do
  name=${svc%%:*} port=${svc##*:}
  for _ in $(seq 1 120); do up "$port" && break; sleep 0.5; done
  if up "$port"; then echo "services: $name up on $port" >&2; else echo "services: $name NOT answering on $port" >&2; failed=1; fi
done
exit $failed
