-- Runs once, when the PostgreSQL data volume is first initialised (docker-entrypoint-initdb.d).
-- One database per HDX service, so no service can read or lock another's tables.
-- Each service creates its own tables at start-up.
CREATE DATABASE hdx_patient_index;
CREATE DATABASE hdx_consent;
CREATE DATABASE hdx_exchange;
