"""The broker URLs of Sentinel and Redis Cluster: parsed once (config.values.multi_host_url),
accepted by the `broker` key, refused with a message naming the key and never the password."""

import pytest

from pusherd.config.values import Invalid, broker_url, mask_url, multi_host_url
from test_settings import prod, prod_problem


def test_sentinel_url_parts():
    u = multi_host_url("redis+sentinel://app:s3cret@10.0.0.1:26379,[::1]:26380/mymaster/2?sentinel_password=x%40y")
    assert (u.scheme, u.username, u.password, u.service, u.db) == ("redis+sentinel", "app", "s3cret", "mymaster", 2)
    assert u.hosts == [("10.0.0.1", 26379), ("::1", 26380)] and u.query == {"sentinel_password": "x@y"}
    assert multi_host_url("redis+sentinel://h:26379/m").db == 0


def test_cluster_url_parts():
    u = multi_host_url("redis+cluster://:pw@h1:7000,h2:7001/")
    assert (u.scheme, u.password, u.service, u.db, u.hosts) == ("redis+cluster", "pw", None, 0, [("h1", 7000), ("h2", 7001)])


@pytest.mark.parametrize("broker", ["redis+sentinel://h1:26379,h2:26379/mymaster/0",
                                    "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"])
def test_topology_brokers_are_accepted(broker):
    assert prod(broker=broker).broker == broker


@pytest.mark.parametrize("broker, why", [
    ("redis+sentinel://:s3cret@h1:26379", "needs the master's name"),
    ("redis+sentinel://:s3cret@h1:26379/m/x", "needs the master's name"),
    ("redis+sentinel://:s3cret@h1/m", "host:port"),
    ("redis+cluster://:s3cret@h1:99999", "host:port"),
    ("redis+cluster://:s3cret@h1:7000/0", "takes no path"),
    ("redis+cluster://:s3cret@h1:7000?password=s3cret", "has no option"),
    ("redis+sentinel://:s3cret@,h:1/m", "host:port"),
])
def test_bad_topology_urls_say_why_and_never_show_the_password(broker, why):
    problem = prod_problem(broker=broker)
    assert "broker" in problem and why in problem and "s3cret" not in problem, problem
    with pytest.raises(Invalid):
        broker_url(broker)


def test_multi_host_passwords_are_masked():
    shown = mask_url("redis+sentinel://u:s3cret@h1:26379,h2:26379/m/0?sentinel_password=s3cret")
    assert "s3cret" not in shown and shown.startswith("redis+sentinel://u:***@h1:26379,h2:26379/m/0")
