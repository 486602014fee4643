"""`deploykit predict`: not yet registered."""
