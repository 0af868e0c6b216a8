"""Local emulators of the Dynamics 365 Web API and the Campaign Standard REST API."""
