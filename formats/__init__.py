"""Architecture and format knowledge as data (installed as the package ``convkit.formats``)."""
