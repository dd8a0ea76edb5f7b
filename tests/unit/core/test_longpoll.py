"""core/longpoll.py: session tokens, connect params, POST batches, poll answers, the outbox."""

import base64
import itertools
import json

import pytest

from pusherd.core.longpoll import (LongPollError, Outbox, as_objects, connect_params, mint_token, new_node_id,
                                   page_origin, parse_token, poll_body, reap_after, secret_matches, session_token,
                                   split_batch)
from pusherd.core.protocol import LEGACY, V1, V2
from pusherd.core.tokens import looks_like_jwt


def counting_random():
    counter = itertools.count(1)
    return lambda n: bytes([next(counter) % 256]) * n


def test_a_token_names_its_node_and_session_and_carries_256_random_bits():
    random = counting_random()
    node = new_node_id(random)
    token, sid, secret = mint_token(node, random)
    assert parse_token(token) == (node, sid, secret)
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32
    assert not looks_like_jwt(token)           # never taken for a page's JWT `token` param
    other, _, other_secret = mint_token(node, random)
    assert other != token and other_secret != secret


@pytest.mark.parametrize("value", [None, "", "null", "a.b.c", "x" * 76, "0" * 16 + "." + "0" * 16 + "!" * 43,
                                   "0" * 16 + "." + "0" * 58])
def test_anything_else_is_no_session_token(value):
    assert parse_token(value) is None


def test_secrets_compare_in_constant_time_and_exactly():
    assert secret_matches("abc", "abc") and not secret_matches("abc", "abd")


def test_the_session_token_is_the_header_or_the_last_token_param():
    assert session_token({"token": ["jwt", "sess"]}, None) == "sess"
    assert session_token({"token": ["sess"]}, "from-header") == "from-header"
    assert session_token({}, None) is None


def test_connect_params_keep_the_pages_token_and_drop_a_session_token():
    token, _, _ = mint_token("0" * 16, counting_random())
    assert connect_params({"token": ["page-jwt", token], "vsn": ["2.0.0"], "a": ["1", "2"]}) == \
        {"token": "page-jwt", "vsn": "2.0.0", "a": "2"}
    assert connect_params({"token": [token]}) == {}


def test_split_batch_ndjson_lines_text_and_base64_binary():
    body = b'[null,"1","t","phx_join",{}]\r\n\n[null,"2","t","msg",{}]\n' + base64.b64encode(b"\x00bin")
    assert split_batch(body, "application/x-ndjson; charset=utf-8", 1000) == [
        '[null,"1","t","phx_join",{}]', '[null,"2","t","msg",{}]', b"\x00bin"]
    assert split_batch(b'{"topic":"t"}\n{"x":1}', "application/json", 1000) == ['{"topic":"t"}\n{"x":1}']


@pytest.mark.parametrize("body,ctype,status,reason", [
    (b"\n".join([b"[1]"] * 101), "application/x-ndjson", 413, "more than 100 messages in one POST"),
    (b"[" + b"1" * 100 + b"]", "application/x-ndjson", 413, "message larger than max_frame_bytes (50)"),
    (b"not base64!", "application/x-ndjson", 400, "ndjson line is neither a JSON array nor base64"),
    (b"[\xff]", "application/x-ndjson", 400, "message is not UTF-8"),
    (b"\xff", "application/json", 400, "message is not UTF-8"),
])
def test_split_batch_refuses_the_whole_body(body, ctype, status, reason):
    with pytest.raises(LongPollError) as err:
        split_batch(body, ctype, 50)
    assert (err.value.status, err.value.reason) == (status, reason)


def test_poll_body_v2_strings_v1_objects():
    text = V2.encode_broadcast("t", "e", {"n": "é"})
    assert json.loads(poll_body(200, "tok", [text])) == {"status": 200, "token": "tok", "messages": [text]}
    v1 = V1.encode_broadcast("t", "e", {"n": 1})
    assert json.loads(poll_body(200, "tok", [v1], objects=True))["messages"] == [json.loads(v1)]
    assert json.loads(poll_body(410, "tok")) == {"status": 410, "token": "tok", "messages": []}
    assert as_objects(V1) and as_objects(LEGACY) and not as_objects(V2)


def test_outbox_is_bounded_and_keeps_nothing_past_its_limit():
    box = Outbox(10)
    assert box.add("12345") and box.add("12345")
    assert not box.add("1")
    assert box.take() == ["12345", "12345"] and len(box) == 0 and box.size == 0


def test_page_origin():
    assert page_origin({"Origin": "https://a.example.com"}, "http://h:1") == ("https://a.example.com", True)
    assert page_origin({"Sec-Fetch-Site": "same-origin"}, "http://h:1") == ("http://h:1", True)
    assert page_origin({}, "http://h:1") == (None, False)


def test_reaping_after_one_and_a_half_windows_or_half_of_one_never_polled():
    assert reap_after(10, True) == 15 and reap_after(10, False) == 5
