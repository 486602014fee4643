"""`deploykit serve`: not yet registered."""
