"""config: which variable names the Redis URL, hiding passwords, checking a URL up front."""

from __future__ import annotations

from typing import Any

import pytest

from aiotasks import App
from aiotasks.config import (
    DEFAULT_REDIS_URL,
    InvalidRedisURL,
    check_redis_url,
    env_redis_source,
    env_redis_url,
    redact_url,
    resolve_redis_url,
)

SECRET = "s3cr3t-pw"


# -- the environment rule ---------------------------------------------------------------


def test_env_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOTASKS_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert env_redis_url() is None and env_redis_source() is None
    assert resolve_redis_url(None) == DEFAULT_REDIS_URL
    monkeypatch.setenv("REDIS_URL", "redis://a/0")
    assert env_redis_source() == ("REDIS_URL", "redis://a/0")
    monkeypatch.setenv("AIOTASKS_REDIS_URL", "redis://b/1")
    assert env_redis_source() == ("AIOTASKS_REDIS_URL", "redis://b/1")
    assert resolve_redis_url(None) == "redis://b/1"
    assert resolve_redis_url("redis://c/2") == "redis://c/2"  # the argument wins
    monkeypatch.setenv("AIOTASKS_REDIS_URL", "")  # empty counts as unset
    assert env_redis_url() == "redis://a/0"
    monkeypatch.setenv("REDIS_URL", "  ")
    assert env_redis_url() is None
    assert App().settings.redis_url == DEFAULT_REDIS_URL


def test_app_reads_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOTASKS_REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://from-redis-url:6379/3")
    assert App().settings.redis_url == "redis://from-redis-url:6379/3"


# -- redact_url -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://alice:{SECRET}@h:6379/0", "redis://alice:***@h:6379/0"),
        (f"redis://:{SECRET}@h:6379/0", "redis://:***@h:6379/0"),
        (f"redis://h:6379/0?password={SECRET}", "redis://h:6379/0?password=***"),
        (f"redis://h/0?db=1&password={SECRET}&x=1", "redis://h/0?db=1&password=***&x=1"),
        (
            f"rediss://:{SECRET}@h:6380/0?ssl_cert_reqs=none",
            "rediss://:***@h:6380/0?ssl_cert_reqs=none",
        ),
        (f"rediss://h/0?ssl_password={SECRET}", "rediss://h/0?ssl_password=***"),
        (f"unix://:{SECRET}@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        (f"unix:///run/redis.sock?password={SECRET}", "unix:///run/redis.sock?password=***"),
        (
            f"redis+sentinel://:{SECRET}@h1:26379,h2:26379/mymaster/0?sentinel_password={SECRET}",
            "redis+sentinel://:***@h1:26379,h2:26379/mymaster/0?sentinel_password=***",
        ),
        (
            f"redis+cluster://bob:{SECRET}@h1:7000,h2:7001",
            "redis+cluster://bob:***@h1:7000,h2:7001",
        ),
        # a lone userinfo may be a password: hidden whole
        (f"redis://{SECRET}@h", "redis://***@h"),
        # unescaped specials in the password
        (f"redis://:p@ss{SECRET}@h/0", "redis://:***@h/0"),
        (f"redis://:pa/ss{SECRET}@h/0", "redis://***@h/0"),
        (f"redis://:pa?ss{SECRET}@h/0", "redis://***@h/0"),
        # URLs that do not parse
        (f"redis://:{SECRET}@[::1/0", "redis://***@[::1/0"),
        (f"redis://:{SECRET}@h:notaport/0", "redis://:***@h:notaport/0"),
        (f"user:{SECRET}@h:6379", "***@h:6379"),
        (f"garbage?password={SECRET}", "garbage?password=***"),
        # nothing to hide: unchanged
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://[::1/0", "redis://[::1/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert SECRET not in redact_url(url)
    assert redact_url(shown) == shown  # hiding twice changes nothing


def test_settings_repr_hides_the_password() -> None:
    app = App(redis_url=f"redis://u:{SECRET}@h/0?password={SECRET}")
    assert app.settings.redis_url.count(SECRET) == 2  # kept for connecting
    assert SECRET not in repr(app.settings)
    assert "redis://u:***@h/0?password=***" in repr(app.settings)


# -- check_redis_url --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://h",
        "redis://:pw@h:6380/15",
        "rediss://h:6380/0?ssl_cert_reqs=none",
        "unix:///run/redis.sock?db=2",
        "redis://[::1]:6379/0",
        "redis://h/0?socket_timeout=1.5",
        "redis://h/0?protocol=3&health_check_interval=2&client_name=w&max_connections=5",
        "redis://h/0?timeout=5",
        "REDIS://h:6379/0",
        "Rediss://h:6380/0?ssl_cert_reqs=none",
        "redis+cluster://h1:7000?read_from_replicas=true",
        "redis+cluster://h1:7000,h2:7001,h3:7002",
        "rediss+cluster://:pw@h1:7000?ssl_cert_reqs=none",
        "redis+sentinel://h1:26379,h2:26379/mymaster",
        "redis+sentinel://:pw@h1:26379/mymaster/2?sentinel_password=spw",
    ],
)
def test_good_urls_pass(url: str) -> None:
    check_redis_url(url)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:6379/0", "unsupported scheme 'http://'"),
        ("redis+sentinel://h:26379", "no service name"),
        ("redis+sentinel://h:26379/m/x", "expected /<service> or /<service>/<db>"),
        ("redis+cluster://h:70000", "the port of 'h:70000' is not a port"),
        ("redis+cluster://h:7000/2", "a cluster has only database 0"),
        ("redis+memcached://h:1", "unsupported scheme 'redis+memcached://'"),
        ("localhost:6379", "not a URL"),
        ("redis://h:notaport/0", "the port is not a number: 'notaport'"),
        ("redis://h:99999/0", "the port is out of range"),
        ("redis://h:0/0", "port 0 is not a port"),
        ("redis://[::1/0", "the host is malformed"),
        ("redis://h/zero", "the database 'zero' (after the host) is not a number"),
        ("redis://h?db=-1", "the database '-1' (db=) is not a number"),
        ("unix://", "no socket path"),
        ("redis://h/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis://h/0?bogus_opt=1", "unknown option 'bogus_opt' after '?'"),
        ("redis://h/0?ssl_cert_reqs=none", "TLS options need rediss://"),
        ("unix:///run/redis.sock?sockettimeout=1", "unknown option 'sockettimeout'"),
        ("redis://h/0?ssl=true", "unknown option 'ssl' after '?'"),
    ],
)
def test_bad_urls_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(InvalidRedisURL) as err:
        check_redis_url(url)
    assert f"invalid Redis URL {url!r}: " in str(err.value)
    assert problem in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_url_message_hides_the_password() -> None:
    with pytest.raises(InvalidRedisURL) as err:
        check_redis_url(f"redis://:{SECRET}@h:notaport/0?password={SECRET}")
    assert SECRET not in str(err.value)
    assert "redis://:***@h:notaport/0?password=***" in str(err.value)


async def test_tls_cluster_and_sentinel_urls_build_tls_clients() -> None:
    """rediss+cluster:// and rediss+sentinel:// speak TLS to every node and primary (the
    clients are only built here: nothing connects)."""
    from redis.asyncio.connection import SSLConnection
    from redis.asyncio.sentinel import SentinelManagedSSLConnection

    from aiotasks.topology import command_client, listener, parse

    top = parse("rediss+cluster://:pw@h1:7000,h2:7001?ssl_cert_reqs=none&protocol=3")
    assert top.options["ssl"] is True and top.options["password"] == "pw"
    cluster: Any = command_client(top, 8)
    # (guarded subclasses: transport.py)
    assert issubclass(cluster.connection_kwargs["connection_class"], SSLConnection)
    assert issubclass(listener(top).connection_pool.connection_class, SSLConnection)

    top = parse("rediss+sentinel://s1:26379,s2:26380/mymaster/2?password=a%26b")
    assert top.nodes == (("s1", 26379), ("s2", 26380))
    assert (top.service, top.db, top.options["password"]) == ("mymaster", 2, "a&b")
    primary = command_client(top, 8)
    assert issubclass(primary.connection_pool.connection_class, SentinelManagedSSLConnection)
    assert issubclass(listener(top).connection_pool.connection_class, SentinelManagedSSLConnection)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0?bogus_opt=1", "redis://127.0.0.1:notaport/0", "http://h/0"]
)
async def test_an_app_with_a_url_that_cannot_work_says_so_before_connecting(url: str) -> None:
    """Not a TypeError or ValueError of redis-py's from the first send: InvalidRedisURL."""
    app = App(redis_url=url)

    @app.task
    async def t() -> None:
        pass

    with pytest.raises(InvalidRedisURL, match="invalid Redis URL"):
        await t.send()
    with pytest.raises(InvalidRedisURL):
        app.worker()


def test_connects_give_up_after_two_seconds_unless_the_url_says_otherwise() -> None:
    from aiotasks import topology

    top = topology.parse("redis+sentinel://h1:26379/mymaster?sentinel_password=spw")
    assert top.options["socket_connect_timeout"] == topology.CONNECT_TIMEOUT
    # Sentinel credentials given, redis-py copies no socket option to the Sentinels.
    assert top.sentinel_options["socket_connect_timeout"] == topology.CONNECT_TIMEOUT
    assert topology.parse("redis+cluster://h1:7000").options["socket_connect_timeout"] == 2.0
    own = topology.parse("redis+cluster://h1:7000?socket_connect_timeout=9").options
    assert own["socket_connect_timeout"] == 9
    # A URL's socket_timeout is its connect timeout too (redis-py's rule): left to it.
    assert (
        "socket_connect_timeout"
        not in topology.parse("redis+cluster://h1:7000?socket_timeout=7").options
    )
    assert topology.connect_timeout_default({}) == {"socket_connect_timeout": 2.0}
