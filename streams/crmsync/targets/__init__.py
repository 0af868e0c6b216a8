"""Clients of the two target APIs: the Dynamics 365 Web API and the Campaign Standard REST API."""
