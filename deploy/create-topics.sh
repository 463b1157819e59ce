#!/bin/bash
# Creates HDX's core Kafka topics; run once by docker-compose.yml's `topics` job with the
# apache/kafka image. Safe to re-run: existing topics are left as they are.
#
# The table below mirrors hdx_shared.topics.Topics.core() (tests/deploy checks that they
# agree). Subscriber feeds, hdx.feed.<subscriber>, are created by the exchange at run time.
#
# It runs as the brokers' admin (kafka-admin.sh, on the admin listener :9091): no HDX service
# may create or alter the core topics (docs/operations.md, "Kafka security").
#
# Environment: BOOTSTRAP_SERVERS, REPLICATION_FACTOR, MIN_INSYNC_REPLICAS, TOPIC_PREFIX,
# ADMIN_USERNAME, ADMIN_PASSWORD, KAFKA_BIN (default /opt/kafka/bin).
set -euo pipefail

bootstrap="${BOOTSTRAP_SERVERS:?set BOOTSTRAP_SERVERS}"
rf="${REPLICATION_FACTOR:-1}"
min_isr="${MIN_INSYNC_REPLICAS:-1}"
prefix="${TOPIC_PREFIX:-hdx.}"
kafka_topics=(/bin/bash "$(dirname "${BASH_SOURCE[0]}")/kafka-admin.sh"
  "${KAFKA_BIN:-/opt/kafka/bin}/kafka-topics.sh")

topic() {  # topic NAME PARTITIONS CONFIG...
  local name="${prefix}$1" partitions="$2"
  shift 2
  local args=()
  for cfg in "$@" "min.insync.replicas=${min_isr}"; do args+=(--config "${cfg}"); done
  "${kafka_topics[@]}" --bootstrap-server "${bootstrap}" --create --if-not-exists \
    --topic "${name}" --partitions "${partitions}" --replication-factor "${rf}" "${args[@]}"
}

# name        partitions  configuration
topic inbound     6  cleanup.policy=delete retention.ms=604800000
topic validated   6  cleanup.policy=delete
topic identified  6  cleanup.policy=delete
topic routed      6  cleanup.policy=delete
topic decided     6  cleanup.policy=delete
topic links       3  cleanup.policy=compact
topic consents    3  cleanup.policy=compact
topic audit       3  cleanup.policy=delete retention.ms=-1
topic audit.anchors 1  cleanup.policy=compact
topic deadletter  3  cleanup.policy=delete retention.ms=-1

"${kafka_topics[@]}" --bootstrap-server "${bootstrap}" --describe --topic "${prefix}.*" \
  | grep -E '^Topic:' || true
echo "HDX topics ready on ${bootstrap}"
