#!/bin/bash
# Creates HDX's Kafka users (SASL/SCRAM-SHA-512) and their ACLs; run once by
# docker-compose.yml's `kafka-acls` job with the apache/kafka image, as the admin
# (kafka-admin.sh). Safe to re-run: passwords are set again, existing ACLs are kept.
#
# The brokers deny whatever no ACL allows (allow.everyone.if.no.acl.found=false), so each
# principal below may use exactly these topics and consumer groups:
# - each HDX service: the topics its code reads and writes, its own groups, and Describe on
#   the hdx.* topics (a service checks at start-up that the core topics exist). The same
#   grants as deploy/k8s/base/kafka-users.yaml; tests/deploy derives the expected sets from
#   the services' code and fails when code, this table or the KafkaUsers drift apart.
# - publisher-st-marys, a demo publisher: writes its own topic hdx.inbound.st-marys, nothing
#   else; the exchange takes what arrives there as St Mary's (docs/security.md).
# - subscriber-oakwood-care-home, a demo subscriber: reads its own feed,
#   hdx.feed.oakwood-care-home, in its own consumer group (named after the user), nothing else.
# docs/operations.md ("Kafka security") says how to add a publisher or a subscriber.
#
# A grant removed from this table stays on the brokers until it is removed by hand
# (kafka-acls.sh --remove) or the stack is recreated (`docker compose down -v`).
#
# Environment: BOOTSTRAP_SERVERS (the admin listener, :9091), TOPIC_PREFIX, ADMIN_USERNAME,
# ADMIN_PASSWORD, one password per user (the variables named in the `user` lines) and
# KAFKA_BIN (default /opt/kafka/bin).
set -euo pipefail

bootstrap="${BOOTSTRAP_SERVERS:?set BOOTSTRAP_SERVERS}"
prefix="${TOPIC_PREFIX:-hdx.}"
groups="${prefix%.}-" # consumer groups: Topics.group("x") is "hdx-x" for prefix "hdx."
bin="${KAFKA_BIN:-/opt/kafka/bin}"
admin=(/bin/bash "$(dirname "${BASH_SOURCE[0]}")/kafka-admin.sh")

user() { # user NAME PASSWORD-VARIABLE
  local name="$1" password="${!2:?set $2}"
  if [[ "${password}" =~ [][,\"\\[:space:]] ]]; then
    echo "$2: a SCRAM password here may not contain , [ ] \" \\ or spaces" >&2
    exit 1
  fi
  "${admin[@]}" "${bin}/kafka-configs.sh" --bootstrap-server "${bootstrap}" --alter \
    --entity-type users --entity-name "${name}" \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=${password}]"
}

acl() { # acl PRINCIPAL topic|group|cluster literal|prefixed NAME OPERATION[,OPERATION...]
  local principal="$1" type="$2" pattern="$3" name="$4" ops="$5"
  local args=(--add --allow-principal "User:${principal}" --resource-pattern-type "${pattern}")
  case "${type}" in
    topic) args+=(--topic "${name}") ;;
    group) args+=(--group "${name}") ;;
    cluster) args+=(--cluster) ;;
    *) echo "unknown resource type ${type}" >&2 && exit 1 ;;
  esac
  local op
  IFS=, read -ra op_list <<<"${ops}"
  for op in "${op_list[@]}"; do args+=(--operation "${op}"); done
  "${admin[@]}" "${bin}/kafka-acls.sh" --bootstrap-server "${bootstrap}" "${args[@]}" >/dev/null
  echo "ACL: User:${principal} ${ops} on ${type} ${name} (${pattern})"
}

# ---- users: name, and the variable that holds its password
user hdx-patient-index            PATIENT_INDEX_PASSWORD
user hdx-consent                  CONSENT_PASSWORD
user hdx-exchange                 EXCHANGE_PASSWORD
user publisher-st-marys           PUBLISHER_ST_MARYS_PASSWORD
user subscriber-oakwood-care-home SUBSCRIBER_OAKWOOD_CARE_HOME_PASSWORD

# ---- ACLs. Write on a topic also allows idempotent producing (Kafka 3.0+, KIP-679);
# IdempotentWrite on the cluster is kept for older clients, as in the KafkaUsers.
# principal        resource pattern  name                             operations
acl hdx-patient-index topic   literal  "${prefix}validated"           Read,Describe
acl hdx-patient-index topic   literal  "${prefix}identified"          Write,Describe
acl hdx-patient-index topic   literal  "${prefix}links"               Write,Describe
acl hdx-patient-index topic   literal  "${prefix}audit"               Write,Describe
acl hdx-patient-index topic   literal  "${prefix}deadletter"          Write,Describe
acl hdx-patient-index topic   prefixed "${prefix}"                    Describe
acl hdx-patient-index group   literal  "${groups}patient-index"       Read
acl hdx-patient-index cluster literal  kafka-cluster                  IdempotentWrite

acl hdx-consent       topic   literal  "${prefix}routed"              Read,Describe
acl hdx-consent       topic   literal  "${prefix}consents"            Read,Write,Describe
acl hdx-consent       topic   literal  "${prefix}decided"             Write,Describe
acl hdx-consent       topic   literal  "${prefix}audit"               Write,Describe
acl hdx-consent       topic   literal  "${prefix}deadletter"          Write,Describe
acl hdx-consent       topic   prefixed "${prefix}"                    Describe
acl hdx-consent       group   literal  "${groups}consent"             Read
acl hdx-consent       cluster literal  kafka-cluster                  IdempotentWrite

acl hdx-exchange      topic   literal  "${prefix}inbound"             Read,Describe
acl hdx-exchange      topic   literal  "${prefix}identified"          Read,Describe
acl hdx-exchange      topic   literal  "${prefix}decided"             Read,Describe
acl hdx-exchange      topic   literal  "${prefix}audit"               Read,Write,Describe
acl hdx-exchange      topic   literal  "${prefix}audit.anchors"       Read,Write,Describe
acl hdx-exchange      topic   literal  "${prefix}validated"           Write,Describe
acl hdx-exchange      topic   literal  "${prefix}routed"              Write,Describe
acl hdx-exchange      topic   literal  "${prefix}deadletter"          Write,Describe
acl hdx-exchange      topic   prefixed "${prefix}feed."               Create,Write,Describe
acl hdx-exchange      topic   prefixed "${prefix}inbound."            Create,Read,Describe
acl hdx-exchange      topic   prefixed "${prefix}"                    Describe
acl hdx-exchange      group   literal  "${groups}exchange-ingress"    Read
acl hdx-exchange      group   literal  "${groups}exchange-router"     Read
acl hdx-exchange      group   literal  "${groups}exchange-delivery"   Read
acl hdx-exchange      group   literal  "${groups}exchange-audit-log"  Read
acl hdx-exchange      cluster literal  kafka-cluster                  IdempotentWrite

acl publisher-st-marys topic  literal  "${prefix}inbound.st-marys"   Write,Describe
acl publisher-st-marys cluster literal kafka-cluster                  IdempotentWrite

acl subscriber-oakwood-care-home topic literal "${prefix}feed.oakwood-care-home" Read,Describe
acl subscriber-oakwood-care-home group literal subscriber-oakwood-care-home    Read

echo "HDX Kafka users and ACLs ready on ${bootstrap}"
