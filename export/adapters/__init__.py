"""One adapter per model family: everything family-specific lives here."""
