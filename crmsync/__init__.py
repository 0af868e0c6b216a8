"""crmsync: keeps Dynamics 365 and Adobe Campaign Standard in sync through Apache Kafka."""

__version__ = "0.1.0"
