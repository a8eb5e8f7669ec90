"""CRM connectors: one small interface (`connectors.base.Connector`), found through entry points."""
