"""The facts ``scripts/test-servers.sh`` publishes cannot be mistaken for configuration.

A shell that reads ``.testservers/env`` (``set -a; . .testservers/env``) passes
every fact to what it starts next. docker-registry reads any ``REGISTRY_*``
variable as a configuration override, libpq reads ``PG*``, boto reads
``AWS_*``, and gpufleet reads its own settings (``S3_*``, ``POSTGRES_*``, ...).
A fact named like one of those would quietly reconfigure the server or the
command under test, so every fact carries one prefix that nothing reads.
"""

from __future__ import annotations

from tests.settings_docs import settings_models, variable_names

PREFIX = "GPUFLEET_TEST_"

# What the servers and the libraries in the tests read from their environment.
FOREIGN_PREFIXES = ("REGISTRY_", "PG", "AWS_", "MOTO_", "BOTO_", "S3_", "POSTGRES_")


def test_every_server_publishes_its_facts_under_the_test_prefix(
    test_servers: dict[str, str],
) -> None:
    servers = {"PG": "postgres", "REGISTRY": "registry", "S3": "s3"}
    published = {name for key in test_servers for name in servers if key.startswith(PREFIX + name)}
    assert published == set(servers)  # every server is running and found
    assert [key for key in test_servers if not key.startswith(PREFIX)] == []


def test_no_fact_is_a_variable_a_server_or_library_reads(test_servers: dict[str, str]) -> None:
    assert [key for key in test_servers if key.startswith(FOREIGN_PREFIXES)] == []


def test_no_gpufleet_setting_reads_a_server_fact(test_servers: dict[str, str]) -> None:
    settings = {
        name
        for model in settings_models()
        for field_name, field in model.model_fields.items()
        for name in variable_names(model, field_name, field)
    }
    assert len(settings) > 50  # the walk found the models
    assert sorted(settings & set(test_servers)) == []
    assert [name for name in settings if name.startswith(PREFIX)] == []
