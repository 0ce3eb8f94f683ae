"""Cross-cutting plumbing: configuration, logging, HTTP endpoints, retry, errors."""
