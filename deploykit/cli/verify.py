"""`deploykit verify`: not yet registered."""
