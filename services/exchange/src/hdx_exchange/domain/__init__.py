"""The exchange's domain core: ingress rules, subscription matching, notifications.

Pure functions over bytes and plain data; no Kafka, database or HTTP imports.
"""
