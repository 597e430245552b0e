"""Sentinel URLs and the settings that need a master's name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from producer.protocol.celeryconf import celery_config
from producer.protocol.connect import SentinelURL, redis_client
from producer.protocol.settings import ClientSettings

URL = "sentinel://:p%40ss@10.0.0.1:26379/2;sentinel://10.0.0.2:26380;sentinel://10.0.0.3"


def test_a_sentinel_url_names_every_sentinel_and_the_masters_password_and_db() -> None:
    parts = SentinelURL.parse(URL)
    assert parts.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert parts.password == "p@ss" and parts.db == 2
    with pytest.raises(ValueError, match="not a sentinel://host:port URL"):
        SentinelURL.parse("sentinel://a:1;redis://b:2")


def test_a_sentinel_url_without_a_master_name_is_refused_with_what_to_set() -> None:
    with pytest.raises(ValidationError, match="set BLIPQ_REDIS_MASTER_NAME"):
        ClientSettings(redis_url=URL)
    with pytest.raises(ValidationError, match="set BLIPQ_REDIS_MASTER_NAME"):
        ClientSettings(broker_url=URL)
    with pytest.raises(ValueError, match="BLIPQ_REDIS_MASTER_NAME"):
        redis_client(URL)


def test_celery_gets_the_master_name_for_broker_and_results() -> None:
    config = celery_config(ClientSettings(redis_url=URL, redis_master_name="blipq"))
    assert config["broker_url"] == URL
    assert config["result_backend"].endswith(f"SentinelResultBackend+{URL}")
    assert config["broker_transport_options"] == {"master_name": "blipq"}
    assert config["result_backend_transport_options"] == {"master_name": "blipq"}
    plain = celery_config(ClientSettings(redis_url="redis://127.0.0.1:6379/0"))
    assert plain["result_backend"].endswith(":ResultBackend+redis://127.0.0.1:6379/0")
    assert plain["broker_transport_options"] == {}
