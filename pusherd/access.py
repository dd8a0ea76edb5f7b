"""The channel rules: who may listen to and who may publish on a topic.

``public:*`` topics need no token. Any other topic needs a verified token whose ``listen``
(or ``publish``) claim has a matching pattern. (The old Phoenix app had this check inverted
for publishing and built regexes from claims; both are fixed here by construction.)
"""

from typing import Optional

from .tokens import Claims
from .topics import any_match, is_public


def may_listen(topic: str, claims: Optional[Claims]) -> bool:
    if is_public(topic):
        return True
    return claims is not None and any_match(claims.listen, topic)


def may_publish(topic: str, claims: Optional[Claims]) -> bool:
    if is_public(topic):
        return True
    return claims is not None and any_match(claims.publish, topic)
