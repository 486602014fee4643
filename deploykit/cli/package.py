"""`deploykit package`: not yet registered."""
