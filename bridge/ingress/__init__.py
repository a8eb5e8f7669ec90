"""Ingress security: who may post a webhook (auth, signatures), and how much (limits)."""
