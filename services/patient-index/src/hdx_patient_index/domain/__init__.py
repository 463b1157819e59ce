"""The patient index's pure core: demographics, normalisation, blocking, Fellegi–Sunter
matching and the golden record. No Kafka, database or HTTP imports here."""
