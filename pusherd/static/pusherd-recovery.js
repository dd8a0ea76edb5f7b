/*
 * pusherd-recovery.js: never miss a deploy event. Works with every phoenix.js (1.2 -> 1.8).
 *
 * pusherd puts each broadcast's position ("<epoch>:<offset>") in the frame's ref on topics that
 * keep history. This helper remembers the last position seen on a channel and sends it as
 * `since` on every (re)join, so pusherd replays what was missed while the page was disconnected.
 * When pusherd cannot replay everything (history lost or too old) the join reply says
 * `recovered: false` and `onGap` runs: reload or refetch.
 *
 *   var channel = PusherdRecovery.channel(socket, "deploys:web",
 *       {guardian_token: token, csrf_token: csrf},
 *       {since: initialPosition,                 // optional: rendered by Rails from POST /publish
 *        onGap: function () { location.reload() }});
 *   channel.on("new_version", function () { location.reload() });
 *   channel.join();
 */
(function (root, factory) {
  if (typeof module === "object" && module.exports) { module.exports = factory(); }
  else { root.PusherdRecovery = factory(); }
}(typeof self !== "undefined" ? self : this, function () {
  var POSITION = /^[^:]+:\d+$/;

  function isPosition(ref) { return typeof ref === "string" && POSITION.test(ref); }

  function channel(socket, topic, params, options) {
    params = params || {};
    options = options || {};
    if (options.since) { params.since = options.since; }
    // phoenix.js keeps a reference to `params` (1.2: the object, 1.3+: a closure returning it)
    // and sends it on every rejoin, so updating `params.since` is enough.
    var ch = socket.channel(topic, params);
    var onMessage = ch.onMessage;
    ch.onMessage = function (event, payload, ref) {
      if (isPosition(ref) && event.indexOf("phx_") !== 0 && event.indexOf("chan_reply_") !== 0) {
        params.since = ref;
      }
      return onMessage.apply(this, arguments);
    };
    // The join reply carries {recovered, position} when `since` was sent. Hooks on the join
    // push stay registered for every rejoin.
    ch.joinPush.receive("ok", function (response) {
      if (!response || !isPosition(response.position)) { return; }
      if (response.recovered === false) {
        var missed = !!params.since;
        params.since = response.position;
        if (missed && options.onGap) { options.onGap(response); }
      } else if (!params.since) {
        params.since = response.position;
      }
    });
    return ch;
  }

  return { channel: channel, isPosition: isPosition };
}));
