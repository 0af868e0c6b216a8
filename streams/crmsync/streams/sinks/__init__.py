"""Clients that write into the target SaaS APIs (Dynamics 365, Campaign Standard)."""
