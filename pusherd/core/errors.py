"""One small exception tree, and the reason strings that are part of the wire contract.

Clients and publishers see only these stable reasons; logs carry the precise cause
(never a token or a secret).
"""


# --- join / push reply reasons (Phoenix replies {"status": "error", "response": {"reason": R}}) ---
AUTHENTICATION_REQUIRED = "authentication_required"
INVALID_TOKEN = "invalid_token"
TOKEN_EXPIRED = "token_expired"
CSRF_MISMATCH = "csrf_mismatch"
FORBIDDEN = "forbidden"
UNMATCHED_TOPIC = "unmatched topic"          # Phoenix's own wording, with a space
INVALID_TOPIC = "invalid_topic"
TOO_MANY_CHANNELS = "too_many_channels"
RATE_LIMITED = "rate_limited"
MALFORMED_MESSAGE = "malformed_message"
INVALID_EVENT = "invalid_event"
EVENT_NOT_ALLOWED = "event_not_allowed"      # a valid name, but not in client_events
INVALID_PAYLOAD = "invalid_payload"
UNSUPPORTED_BINARY = "binary_not_supported"
UNAVAILABLE = "unavailable"

# --- WebSocket close codes (RFC 6455). Never 1000 when the client should come back. ---
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013


class PusherdError(Exception):
    """Base of every error pusherd raises on purpose."""


#: A refusal's detail is for the log: cut to this length (a library's error text can quote a
#: client's input at length, e.g. PyJWT's for a ``crit`` header).
MAX_DETAIL = 200


class Refusal(PusherdError):
    """Client input refused: `reason` is one of the stable reasons above (what the client is
    told), `detail` the precise cause for the log (cut at `MAX_DETAIL`, never a token)."""

    def __init__(self, reason: str, detail: str = ""):
        detail = detail if len(detail) <= MAX_DETAIL else detail[:MAX_DETAIL] + "..."
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class AuthError(Refusal):
    """A token was refused."""


class ProtocolError(Refusal):
    """A client frame could not be understood."""


class PublishError(PusherdError):
    """An HTTP publish request was refused: `status` is the HTTP status, `reason` goes in the JSON body."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class BrokerUnavailable(PusherdError):
    """The broker could not take a publish (e.g. Redis is down): the publisher should retry.

    The message is for the log (it may name the broker's address, masked); ``published`` and
    ``total``, when known, say how much of a batch was published all the same, which the
    publisher is told."""

    def __init__(self, message: str = "", published: "int | None" = None, total: "int | None" = None):
        super().__init__(message)
        self.published = published
        self.total = total


class StartupError(PusherdError):
    """pusherd cannot start as configured (e.g. the Redis broker without redis-py installed)."""
