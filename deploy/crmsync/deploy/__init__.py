"""Everything needed to run crmsync locally: Kafka launcher and API emulators."""
