"""crm-bridge: outreach-platform webhooks into Salesforce and HubSpot, durably and exactly once.

Data flow: ingest (server) -> store -> rules -> delivery -> connectors.
"""

__version__ = "0.1.0"
