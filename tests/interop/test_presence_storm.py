"""A join storm on a presence topic with the real phoenix.js 1.8: 2,000 sockets join within a few
seconds; every page ends with the same 2,000-entry list as the server's, and the frames sent stay
far below N² (diffs are coalesced per window). Prints the counts; figures are in bench/."""

import pytest

from presence_storm import run_storm
from pusherd_testing import GUARDIAN_SECRET, PUBLISH_SECRET

pytestmark = pytest.mark.interop

N = 2000


def test_a_storm_of_2000_joins_ends_with_one_list_everywhere_in_far_fewer_than_n2_frames(
        pusherd_factory, node_modules_ready):
    daemon = pusherd_factory({"presence": [{"topics": "private:*", "key": "id", "meta": ["name"], "limit": N}],
                              "log_level": "info", "access_log": False})

    def server_list():
        status, body, _ = daemon.request("GET", "/presence?topic=private:storm",
                                         headers={"Authorization": "Bearer " + PUBLISH_SECRET}, timeout=30)
        assert status == 200, body
        return body

    summary = run_storm(daemon.ws_url, "private:storm", N, GUARDIAN_SECRET, presence=True,
                        server_list=server_list, rate=1000, timeout=90)
    print("storm of %d joins: complete in %.1fs, %d frames (N² = %d), %.1f MB sent"
          % (N, summary["seconds"], summary["frames"], N * N, summary["bytes"] / 1e6))
    assert summary["complete"] and summary["joined"] == N and summary["errors"] == 0, summary
    assert summary["server"]["size"] == N
    # Every socket's list (20 through phoenix.js's own Presence, the rest folded frame by frame)
    # is the server's list: same metas, same phx_refs.
    assert summary["lists"] == {summary["server"]["digest"]: N}, summary
    # A reply and a presence_state per socket, then one diff per window to the members then:
    # nowhere near a frame per join per member.
    assert summary["frames"] < N * N / 20, summary["frames"]
