"""`deploykit bench`: not yet registered."""
