#!/usr/bin/env bash
# Makes sure the servers the tests use answer on loopback: PostgreSQL on 127.0.0.1:5432
# (user postgres, no password), MariaDB on 127.0.0.1:3306 (user root, no password) and Redis
# on 127.0.0.1:6379 (keeping nothing on disk). A server that already answers is left alone; one that does not is installed
# from Debian's packages (as root, no systemd needed) and started with loopback-only,
# trust-authentication settings meant for a test machine, never for production. NATS with
# JetStream answers on 127.0.0.1:4222 (its store in $SERVICES_DIR/nats), RabbitMQ on
# 127.0.0.1:5672 (user guest, loopback only).
#
#   scripts/services.sh [postgres] [mariadb] [redis] [nats] [rabbitmq]      (default: all)
#
# Logs go to $SERVICES_DIR (default /tmp/conveyor-services). Exits non-zero if a server
# cannot be made to answer, naming it.
set -euo pipefail

SERVICES_DIR=${SERVICES_DIR:-/tmp/conveyor-services}
WAIT_SECONDS=${WAIT_SECONDS:-120}
export DEBIAN_FRONTEND=noninteractive

say() { echo "[services] $*" >&2; }
fail() { say "ERROR: $*"; exit 1; }
answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Waits until "$@" succeeds, up to WAIT_SECONDS.
wait_until() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# Installs the Debian packages named that are missing, without letting their scripts start
# daemons with stock settings.
install_missing() {
    local missing=() package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$package")
    done
    ((${#missing[@]})) || return 0
    [ "$(id -u)" = 0 ] || fail "installing ${missing[*]} needs root"
    say "installing ${missing[*]}"
    local policy=/usr/sbin/policy-rc.d placed=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && placed=1
    fi
    apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    ((placed)) && rm -f "$policy"
    return 0
}

start_postgres() {
    answers 5432 && return 0
    install_missing postgresql
    local version config
    version=$(ls /usr/lib/postgresql | sort -V | tail -n1)
    config=/etc/postgresql/$version/main
    pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$version main" ||
        pg_createcluster "$version" main >&2
    printf "listen_addresses = '127.0.0.1'\nport = 5432\n" >"$config/conf.d/conveyor-tests.conf"
    printf 'local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' \
        >"$config/pg_hba.conf"
    chown postgres:postgres "$config/conf.d/conveyor-tests.conf" "$config/pg_hba.conf"
    install -d -o postgres -g postgres -m 2775 /var/run/postgresql
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 ||
        fail "PostgreSQL did not start; see /var/log/postgresql/postgresql-$version-main.log"
    wait_until pg_isready -q -h 127.0.0.1 -p 5432 || fail "PostgreSQL does not answer on 5432"
}

start_mariadb() {
    answers 3306 && return 0
    install_missing mariadb-server mariadb-client
    mkdir -p "$SERVICES_DIR"
    local log=$SERVICES_DIR/mariadb.err
    touch "$log" && chown mysql:mysql "$log"
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    [ -d /var/lib/mysql/mysql ] ||
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db >"$SERVICES_DIR/mariadb-install.log" 2>&1
    # Loopback only, whatever the installed configuration says: flags override it.
    start-stop-daemon --start --quiet --background --oknodo --exec /usr/sbin/mariadbd \
        --output "$SERVICES_DIR/mariadb.out" -- --user=mysql --bind-address=127.0.0.1 \
        --port=3306 --skip-name-resolve --log-error="$log"
    wait_until mariadb-admin --protocol=socket -u root ping || fail "MariaDB did not start; see $log"
    # Root over TCP with no password, as the tests connect.
    mariadb -u root <<'SQL'
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
SQL
    wait_until answers 3306 || fail "MariaDB does not answer on 3306"
}

start_redis() {
    # Also where a Redis answers: the broker tests run redis-server of their own, to stop
    # and start it.
    install_missing redis-server
    answers 6379 && return 0
    mkdir -p "$SERVICES_DIR/redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --protected-mode yes \
        --save '' --appendonly no --dir "$SERVICES_DIR/redis" \
        --logfile "$SERVICES_DIR/redis.log"
    wait_until answers 6379 || fail "Redis does not answer on 6379; see $SERVICES_DIR/redis.log"
}

# A real NATS handshake (INFO, CONNECT, PING, PONG), not just an open port.
nats_answers() {
    timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222; read -r line <&3; [[ $line == INFO* ]] || exit 1
        printf "CONNECT {\"verbose\":false}\r\nPING\r\n" >&3; read -r line <&3; [[ $line == PONG* ]]' 2>/dev/null
}

start_nats() {
    # Also where a NATS answers: the broker tests run nats-server of their own, to stop
    # and start it.
    install_missing nats-server
    nats_answers && return 0
    mkdir -p "$SERVICES_DIR/nats"
    start-stop-daemon --start --quiet --background --make-pidfile \
        --pidfile "$SERVICES_DIR/nats.pid" --output "$SERVICES_DIR/nats.log" \
        --exec "$(command -v nats-server)" -- \
        --addr 127.0.0.1 --port 4222 --jetstream --store_dir "$SERVICES_DIR/nats"
    wait_until nats_answers || fail "NATS does not answer on 4222; see $SERVICES_DIR/nats.log"
}

start_rabbitmq() {
    answers 5672 && return 0
    install_missing rabbitmq-server
    install -d -o rabbitmq -g rabbitmq /etc/rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
    cat >/etc/rabbitmq/rabbitmq-env.conf <<'CONF'
NODENAME=rabbit@localhost
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=5672
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
CONF
    printf 'listeners.tcp.default = 127.0.0.1:5672\nloopback_users.guest = true\n' \
        >/etc/rabbitmq/rabbitmq.conf
    printf '[].\n' >/etc/rabbitmq/enabled_plugins
    # epmd first, on loopback, so that neither the server nor its CLI starts one on 0.0.0.0.
    answers 4369 || epmd -address 127.0.0.1 -daemon
    rabbitmq-server -detached >"$SERVICES_DIR/rabbitmq.log" 2>&1
    wait_until answers 5672 || fail "RabbitMQ does not answer on 5672; see $SERVICES_DIR/rabbitmq.log"
    # The port opens just before the broker has finished booting.
    timeout "$WAIT_SECONDS" rabbitmqctl -q await_startup >/dev/null ||
        fail "RabbitMQ did not finish starting; see /var/log/rabbitmq"
}

services=("$@")
((${#services[@]})) || services=(postgres mariadb redis nats rabbitmq)
for service in "${services[@]}"; do
    case $service in
    postgres) start_postgres ;;
    mariadb) start_mariadb ;;
    redis) start_redis ;;
    nats) start_nats ;;
    rabbitmq) start_rabbitmq ;;
    *) fail "unknown service $service (postgres, mariadb, redis, nats or rabbitmq)" ;;
    esac
    say "$service answers"
done
