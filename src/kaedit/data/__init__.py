"""Datasets: raw rows from a local file, a URL or the Hugging Face hub become ``EditRequest``s."""

from kaedit.data.base import DatasetError, from_config, load_requests, resolve_source

__all__ = ["DatasetError", "from_config", "load_requests", "resolve_source"]
