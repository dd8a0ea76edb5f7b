#!/usr/bin/env bash
# Mutation check for the security tests (not in CI): disable one protection at a time, run the
# tests meant to catch it, report, restore the file with git checkout. Every line must say "failed".
# Run from a worktree whose pusherd/ has no uncommitted changes.
set -u
cd "$(dirname "$0")/.."
if ! git diff --quiet -- pusherd; then
  echo "pusherd/ has uncommitted changes; commit or stash them first" >&2
  exit 2
fi
run() {
  local name="$1" file="$2" old="$3" new="$4" tests="$5"
  if ! python - "$file" "$old" "$new" <<'PY'
import sys
f, old, new = sys.argv[1:4]
s = open(f).read()
if old not in s:
    sys.exit(1)
open(f, "w").write(s.replace(old, new))
PY
  then
    echo "$name :: NOT APPLIED (text not found in $file)"
    return
  fi
  out=$(eval "timeout 600 ${PYTHON:-python} -m pytest $tests -q -p no:warnings -x" 2>&1 | tail -1)
  git checkout -q -- "$file"
  echo "$name :: $out"
}
run origin pusherd/core/origins.py "    return policy.allows(origin), origin" "    return True, origin" "tests/security/test_origins_limits.py"
run max_connections pusherd/service.py "        if len(self.connections) >= limit:" "        if False:" "tests/security/test_origins_limits.py -k connections"
run connection_rate pusherd/service.py "        if rate and not self.connection_rate.take(rate, now):" "        if False:" "tests/integration/test_admission.py -k max_new_connections"
run connection_rate_retry_after pusherd/transports/admission.py 'retry_after="1" if refusal == RATE_LIMITED else "5"' 'retry_after="5"' "tests/integration/test_admission.py -k 'max_new_connections and tornado'"
run too_many_channels pusherd/core/session.py "if len(self.channels) >= limits.max_channels:" "if False:" "tests/security/test_hostile_frames.py -k join_flood"
run rate_limit pusherd/core/session.py "if not self._take_token(now):" "if False:" "tests/security/test_hostile_frames.py -k push_flood"
run max_frame pusherd/transports/app.py "websocket_max_message_size=settings.max_frame_bytes," "websocket_max_message_size=10**9," "tests/security/test_hostile_frames.py -k max_frame"
run invalid_topic pusherd/core/session.py "if not is_valid_topic(topic, limits.max_topic_length):" "if not topic:" "tests/security/test_hostile_frames.py -k topic"
run token_expiry pusherd/core/session.py "for channel in [c for c in self.channels.values() if c.expires_at is not None and c.expires_at <= now]:" "for channel in []:" "tests/security/test_hostile_tokens.py -k expired_token_ends"
run nan pusherd/core/protocol.py "json.JSONDecoder(parse_constant=_reject_constant, " "json.JSONDecoder(" "tests/security/test_hostile_frames.py tests/security/test_hostile_publish.py -k nan"
run depth pusherd/core/protocol.py "        if depth > limit:" "        if False:" "tests/security/test_hostile_frames.py tests/security/test_hostile_publish.py -k depth"
run event pusherd/core/session.py 'if not is_valid_event(msg.event) or is_reserved_event(msg.event):' 'if is_reserved_event(msg.event):' "tests/security/test_hostile_frames.py -k events_are_validated"
run grant_check pusherd/transports/http.py "        grant.check(broadcasts)" "        pass" "tests/security/test_hostile_publish.py -k publisher_token"
run publish_exp pusherd/core/tokens.py '    if claims["exp"] <= now:' '    if False:' "tests/security/test_hostile_publish.py -k bad_publisher_tokens"
run join_token_as_publisher pusherd/core/tokens.py '        raise AuthError(INVALID_TOKEN, "a join token (aud csrf) is not a publisher token")' '        pass' "tests/security/test_hostile_publish.py -k browser_join_token"
run slowloris pusherd/daemon.py "idle_connection_timeout=s.http_header_timeout, body_timeout=s.http_body_timeout," "idle_connection_timeout=60, body_timeout=30," "tests/security/test_hostile_publish.py -k slowloris"
run redaction pusherd/daemon.py "        install_tornado_redaction()" "        pass" "tests/security/test_hostile_publish.py -k header_tricks"
run outbox_bound pusherd/fast/direct.py "        stream.max_write_buffer_size = max_bytes" "        pass" "tests/security/test_slow_consumer.py -k stalled_reader"
run stall_drop pusherd/transports/websocket.py "        if self.stalled_for(time.monotonic()) > self.service.config.settings.slow_consumer_seconds:" "        if False:" "tests/security/test_slow_consumer.py -k stalled_too_long"
run key_confusion pusherd/core/tokens.py 'claims = jwt.decode(token, key, algorithms=[self.algorithm], options=options, leeway=self._leeway)' 'claims = jwt.decode(token, key, algorithms=[self.algorithm, "HS256"], options=options, leeway=self._leeway)' "tests/security/test_hostile_tokens.py -k asymmetric"
run rotation pusherd/core/tokens.py '                continue  # maybe the next (rotated) secret' '                break' "tests/security/test_hostile_tokens.py -k rotation"
run surrogate_escape pusherd/core/protocol.py "if not text.isascii():" "if False:" "tests/security/test_hostile_frames.py -k surrogate"
run float_overflow pusherd/core/protocol.py 'raise ValueError("number out of range")' 'return value' "tests/security/test_hostile_frames.py tests/security/test_hostile_publish.py -k overflow"
run push_event_length pusherd/core/protocol.py "0 < len(event) <= MAX_EVENT_LENGTH and " "" "tests/security/test_hostile_frames.py -k events_are_validated"
run asymmetric_without_secret pusherd/core/tokens.py "if not self._secrets and algorithm not in ASYMMETRIC:" "if not self._secrets:" "tests/security/test_hostile_tokens.py -k asymmetric"
run form_utf8 pusherd/core/publish.py 'errors="strict")' 'errors="replace")' "tests/security/test_hostile_publish.py -k \"form and invalid and utf8\""
run duplicate_authorization pusherd/core/publish.py "    if len(authorization) > 1:" "    if False:" "tests/security/test_hostile_publish.py -k duplicate"
run pattern pusherd/core/topics.py "        return len(topic) > len(self._prefix) and topic.startswith(self._prefix)" "        return topic.startswith(self._prefix)" "tests/fuzz/test_properties.py"
# POST /publish is answered by front.PublishConnection (PUSHERD_FAST=1, the default); PublishHandler
# serves it with PUSHERD_FAST=0, and test_fast_paths.py holds the two to the same answers.
run body_413 pusherd/fast/front.py 'if head.content_length > settings.max_publish_bytes:' 'if False:' "tests/security/test_hostile_publish.py -k oversized_body_by_content_length"
run heartbeat pusherd/core/session.py "if now - self.last_seen > self.policy.limits.heartbeat_timeout:" "if False:" "tests/security/test_hostile_frames.py -k silent_socket"
run binary pusherd/core/protocol.py "            return MalformedFrame(\"undecodable binary frame\")" "            raise ValueError" "tests/security/test_hostile_frames.py -k binary"
# hardening, second round (issue 13)
run origin_by_pusherd pusherd/transports/websocket.py "allowed, origin = upgrade_allowed(service.config.origins, self.request.headers)" "allowed, origin = True, None" "tests/security/test_origins_limits.py -k decided_by_pusherd"
run numeric_origin_port pusherd/core/origins.py "if not host or (port and not (port.isascii() and port.isdigit())):" "if not host:" "tests/security/test_origins_limits.py -k numeric_port"
run mask_query_password pusherd/config/values.py "    query = _SECRET_PARAM.sub(lambda m: m.group(1) + m.group(2) + MASK, parts.query)" "    query = parts.query" "tests/security/test_secrets_shown.py"
run healthz_kind_only pusherd/transports/http.py '"broker": broker.name,' '"broker": broker.describe(),' "tests/security/test_secrets_shown.py"
run reserved_events pusherd/core/session.py "if not is_valid_event(msg.event) or is_reserved_event(msg.event):" "if not is_valid_event(msg.event):" "tests/security/test_hostile_frames.py -k impersonate"
run client_events pusherd/core/session.py "if not may_push_event(msg.event, self.policy.limits.client_events):" "if False:" "tests/security/test_hostile_frames.py -k default_to_msg"
run csrf_surrogate pusherd/core/tokens.py "if not _encodable(csrf_token):" "if False:" "tests/security/test_hostile_tokens.py -k surrogate"
# crit: the newest PyJWT refuses crit itself; this line says "failed" with the lowest PyJWT of the range
# (PYTHON=/tmp/pusherd-ci-lowest/bin/python after .ci/run), "passed" on the newest.
run crit_header pusherd/core/tokens.py '    if "crit" in header:' '    if False:' "tests/unit/core/test_tokens.py -k crit"
run log_escape pusherd/logs.py "        record.message = escape(record.message)" "        pass" "tests/security/test_log_forging.py"
run gc_churn pusherd/fast/gc.py "            self.opened = 0
            return True
        return False" "            self.opened = self.closed = 0
            return True
        return False" "tests/unit/fast/test_gc.py -k churn"
# History and the brokers (issue 13): tests/security/test_hostile_history.py runs each on both brokers
# and both fast paths; -k picks the broker a mutation is on.
H=tests/security/test_hostile_history.py
run since_creates_history pusherd/core/history.py "            return decide_history(None, (), since, now, rule.ttl, self.max_recovery, self.intact_since)" "            return self.streams.setdefault(topic, Stream(rule.size, rule.ttl, now=now)).recover(since, now, self.max_recovery)" "$H -k 'since_join_flood and memory'"
run since_creates_history_redis pusherd/brokers/redis.py "if not meta[1] then" "if not meta[1] then redis.call('HSET', KEYS[1], 'epoch', 'x', 'offset', 0)" "$H -k 'since_join_flood and redis'"
run client_pushes_kept pusherd/core/history.py 'if rule is None or (client and not getattr(rule, "client_pushes", False)):' 'if rule is None:' "$H -k 'anonymous_pushes and memory'"
run client_pushes_kept_redis pusherd/brokers/redis.py "if rule is not None and (not client or rule.client_pushes):" "if rule is not None:" "$H -k 'anonymous_pushes and redis'"
run max_history_topics pusherd/core/history.py "while len(self.streams) >= self.max_topics and self._evict(None, LIMIT_TOPICS, now):" "while False:" "$H -k 'max_history_topics and memory'"
run max_history_topics_redis pusherd/brokers/redis.py "while work < BUDGET and redis.call('ZCARD', KEYS[3]) >= max_topics do" "while false do" "$H -k 'max_history_topics and redis'"
run max_history_bytes pusherd/core/history.py "while self.bytes > self.max_bytes and self._evict(topic, LIMIT_BYTES, now):" "while False:" "$H -k 'max_history_bytes and memory'"
run max_history_bytes_redis pusherd/brokers/redis.py "while total > max_bytes and work < BUDGET do" "while false do" "$H -k 'max_history_bytes and redis'"
run envelope_surrogates pusherd/brokers/redis.py '        return protocol._dumps(doc).encode("utf-8")' '        raise' "$H -k 'lone_surrogate and redis'"
run batch_in_order pusherd/brokers/redis.py "echo = bool(self.history_rules) and any(" "echo = False and any(" "$H -k 'lone_surrogate and redis'"
run batch_multi_exec pusherd/brokers/redis.py "            item.group = group" "            item.group = None" "$H -k batch_redis_refuses"
run since_epoch_to_redis pusherd/brokers/redis.py 'epoch_arg = parsed[0] if parsed[0].isascii() else ""' 'epoch_arg = parsed[0]' "$H -k 'since_with and redis'"
run position_ascii_digits pusherd/core/history.py "not offset.isascii() or " "" "$H -k 'since_with and memory'"
# HTTP publishers and the listener (tests/security/test_hostile_http.py), each on both paths where it applies.
run unauthenticated_body_front pusherd/fast/front.py 'self.grant, refusal = authorize_head(self.front.service, head.authorizations)' 'self.grant, refusal = authorize_head(self.front.service, head.authorizations)[0], None' "tests/security/test_hostile_http.py -k 'refused_before_the_body and front'"
run unauthenticated_body_tornado pusherd/transports/http.py 'self._grant, refusal = authorize_head(self.service, self.request.headers.get_list("Authorization"))' 'self._grant, refusal = authorize_head(self.service, self.request.headers.get_list("Authorization"))[0], None' "tests/security/test_hostile_http.py -k 'refused_before_the_body and tornado'"
run max_http_connections pusherd/fast/listener.py "return self.http_connections() < limit or self._make_room(limit)" "return True" "tests/security/test_hostile_http.py -k 'max_http_connections or idle_connection_flood'"
run idle_flood_evicted pusherd/fast/listener.py "return self.http_connections() < limit or self._make_room(limit)" "return self.http_connections() < limit" "tests/security/test_hostile_http.py -k idle_connection_flood"
run storm_unread_kept pusherd/fast/listener.py "                if _unread(sock):" "                if False:" "tests/integration/test_admission.py -k 'storm or unread'"
run keep_alive_last pusherd/fast/listener.py "for waiting in (self.fresh, self.idle):" "for waiting in (self.idle, self.fresh):" "tests/security/test_hostile_http.py -k idle_connection_flood"
run header_timeout_once pusherd/fast/listener.py "params.header_timeout = max(0.0, deadline - stream.io_loop.time())" "pass" "tests/security/test_hostile_http.py -k 'one_header_timeout and front'"
run head_431 pusherd/fast/listener.py "if (isinstance(exc_info, UnsatisfiableReadError)" "if (False" "tests/security/test_hostile_http.py -k 431"
run after_connection_close pusherd/fast/listener.py "            return _Unanswerable()" "            pass" "tests/integration/test_fast_paths.py -k nothing_after_connection_close"
run content_length_ascii pusherd/transports/http.py "if not ASCII_DIGITS.fullmatch(content_length):" "if not content_length.isdigit():" "tests/security/test_hostile_http.py -k content_length_in_non_ascii"
run vsn_ascii pusherd/core/protocol.py '_SEMVER = re.compile(r"^([0-9]+)\.([0-9]+)\.([0-9]+)' '_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)' "tests/security/test_hostile_http.py -k vsn_in_non_ascii"
run token_time_ascii pusherd/core/tokens.py "if isinstance(value, str) and not _DIGITS.fullmatch(value):" "if False:" "tests/security/test_hostile_http.py -k token_exp_as_a_string"
run retry_after_ascii pusherd/client.py 're.fullmatch(r"[0-9]{1,9}", value.strip())' 'value.strip().isdigit()' "tests/integration/test_client_module.py -k retry_after_not_in_ascii"
run other_method_body pusherd/transports/http.py "self._body.refused = True  # its body, if any, is read and dropped, never kept" "pass" "tests/security/test_hostile_http.py -k another_method"
run upgrade_storm_log pusherd/transports/websocket.py "            self.quiet_access_log = True" "            pass" "tests/security/test_hostile_http.py -k storm_of_upgrades"
# presence (issue 16)
run presence_proto_key pusherd/core/presence.py " or key in JS_PROTOTYPE_NAMES:" ":" "tests/security/test_hostile_presence.py -k proto"
run presence_meta_scalar pusherd/core/presence.py "        if not _json_scalar(value):
            return NotTracked(BAD_META, name)" "        pass" "tests/security/test_hostile_presence.py -k meta"
run presence_meta_bytes pusherd/core/presence.py "len(json.dumps(fields, ensure_ascii=False, allow_nan=False).encode(\"utf-8\")) > MAX_META_BYTES" "False" "tests/security/test_hostile_presence.py -k big-meta"
run presence_limit pusherd/core/presence.py "        if others + len(self._own) >= self.limit:" "        if False:" "tests/security/test_hostile_presence.py -k limit"
run presence_only_listed_fields pusherd/core/presence.py "    for name in rule.meta:" "    for name in sub:" "tests/integration/test_presence_daemon.py -k reaches_every_page"
run presence_window pusherd/presence_service.py "            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)" "            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush); self.flush()" "tests/unit/test_presence_service.py -k storm"
run presence_grace pusherd/presence_service.py "        chosen += [e for e in tp.state.entries() if e.node in known and e.node not in alive]" "        pass" "tests/unit/test_presence_service.py -k outage"
run presence_dead_node pusherd/presence_service.py "        if node == self.node or node in self._dead:
            return
        replica" "        if node == self.node:
            return
        replica" "tests/unit/test_presence_service.py -k dead_one"
