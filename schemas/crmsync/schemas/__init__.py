"""Avro event schemas and their codec; imports nothing else of crmsync."""
