"""Local Apache Kafka: obtains the jars from Maven Central, formats KRaft storage, runs brokers."""
