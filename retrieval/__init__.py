"""Reading retrieval databases: open, search by embedding, bands, remote services."""
