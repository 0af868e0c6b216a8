"""The Kafka layer: topics, client options, producers and compacted-topic followers."""
