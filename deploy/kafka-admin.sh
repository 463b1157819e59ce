#!/bin/bash
# Runs a Kafka command-line tool as the broker's admin (docker-compose.yml).
#
#   kafka-admin.sh /opt/kafka/bin/kafka-topics.sh --bootstrap-server kafka:9091 --list
#
# The admin logs in with SASL/PLAIN on the brokers' internal BROKER listener (9091), which only
# the brokers themselves, the broker healthcheck and the one-shot `topics` and `kafka-acls`
# jobs use; it is never published to the host. The admin is the only super user
# (KAFKA_SUPER_USERS): it runs the brokers and controllers and creates topics, users and ACLs.
# HDX services and external clients log in with SCRAM-SHA-512 on 9092/9094 instead.
#
# Environment: ADMIN_USERNAME, ADMIN_PASSWORD. The client settings are written to a file only
# this user can read, and passed to the tool as --command-config.
set -euo pipefail

: "${ADMIN_USERNAME:?set ADMIN_USERNAME}" "${ADMIN_PASSWORD:?set ADMIN_PASSWORD}"
(($# > 0)) || { echo "usage: $0 KAFKA-TOOL ARGS..." >&2; exit 2; }

config="$(umask 077 && mktemp /tmp/hdx-admin.XXXXXX)"
trap 'rm -f "${config}"' EXIT
cat >"${config}" <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="${ADMIN_USERNAME}" password="${ADMIN_PASSWORD}";
EOF

"$@" --command-config "${config}"
