"""Talking to the Kubernetes API server: client setup, raw JSON requests, retries, claims.

``resource.k8s.io`` objects are read as raw JSON and written as plain dicts, because the
client's typed models drop fields they do not know (a client older than the server).
"""
