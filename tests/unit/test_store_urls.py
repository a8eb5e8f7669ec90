"""A store URL is shown (logs, errors, `status`) without its password, in either form."""

import pytest

from bridge.config import PostgresStoreConfig
from bridge.store.postgres import PostgresStore
from bridge.store.urls import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bridge:s3cret@db:5432/crm", "postgresql://bridge@db:5432/crm"),
        ("postgresql://:s3cret@db/crm", "postgresql://db/crm"),
        ("postgresql://bridge@db/crm?password=s3cret", "postgresql://bridge@db/crm"),
        (
            "postgresql://db/crm?sslmode=require&password=s3cret&sslrootcert=%2Fca.pem",
            "postgresql://db/crm?sslmode=require&sslrootcert=%2Fca.pem",
        ),
        (
            "postgresql://db/crm?Pass%77ord=s3cret&application_name=x",
            "postgresql://db/crm?application_name=x",
        ),
        ("postgresql://u:a@b@db/crm?password=s3cret", "postgresql://u@db/crm"),
        ("postgresql://db/crm", "postgresql://db/crm"),
    ],
)
def test_the_password_is_never_shown(url, shown):
    assert redact_url(url) == shown
    # The config's describe() and the store's messages use the one helper.
    assert PostgresStoreConfig(url=url).describe() == shown
    assert repr(PostgresStore(url)) == f"PostgresStore({shown!r})"
    assert "s3cret" not in shown
