"""pusherd.core.access: who may listen to and publish on a topic."""

import pytest

from pusherd.core.access import may_listen, may_publish
from pusherd.core.tokens import Claims
from pusherd.core.topics import compile_patterns


def claims(listen=(), publish=()):
    return Claims(sub={}, listen=compile_patterns(listen), publish=compile_patterns(publish), exp=2e9)


READER = claims(listen=["private:user:42", "deploys:*"])
WRITER = claims(publish=["private:user:42", "chat:*"])
BOTH = claims(listen=["private:user:42"], publish=["private:user:42"])
NOTHING = claims()

TABLE = [
    # topic, claims, may_listen, may_publish
    ("public:a", None, True, True),
    ("public:a:b", None, True, True),
    ("public:a", NOTHING, True, True),
    ("public:", None, False, False),
    ("publicx:a", None, False, False),
    ("private:user:42", None, False, False),
    ("deploys:1", None, False, False),
    ("private:user:42", NOTHING, False, False),
    ("private:user:42", READER, True, False),     # listen does not imply publish
    ("deploys:1", READER, True, False),
    ("deploys:1:logs", READER, True, False),
    ("deploys:", READER, False, False),
    ("private:user:43", READER, False, False),
    ("private:user:42", WRITER, False, True),     # publish does not imply listen
    ("chat:room", WRITER, False, True),
    ("chat:room", READER, False, False),
    ("private:user:42", BOTH, True, True),
    ("private:user:420", BOTH, False, False),
    ("public:a", READER, True, True),             # public needs nothing, with or without a token
]


@pytest.mark.parametrize("topic,granted,listen,publish", TABLE)
def test_access_table(topic, granted, listen, publish):
    assert may_listen(topic, granted) is listen
    assert may_publish(topic, granted) is publish


def test_claim_strings_are_never_regexes():
    regexy = claims(listen=["private:.*", "priv.te:*"], publish=["private:.*"])
    assert not may_listen("private:user:42", regexy)
    assert not may_publish("private:user:42", regexy)
    assert not may_listen("private:x", regexy)
    assert may_listen("priv.te:x", regexy)
