"""kaedit: sequential knowledge editing of language models (AdaPLE and friends)."""

__version__ = "0.1.0"
