"""The dashboard's fan-out feed and its settings: resume after any frame, no gap, no duplicate."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.dashboard.config import DashboardConfig, DashboardConfigError
from aqimodels.client.dashboard.feeds import Feed, event_to_dict, frame


def _collect(feed: Feed, after: int, n: int) -> list[bytes]:
    async def run() -> list[bytes]:
        out: list[bytes] = []
        async for data in feed.follow(after):
            out.append(data)
            if len(out) == n:
                break
        return out

    return asyncio.run(run())


def test_followers_resume_after_their_last_id_while_frames_arrive() -> None:
    async def scenario() -> tuple[list[list[int]], list[int]]:
        feed = Feed()
        for seq in (1, 2, 3):
            feed.publish(seq, frame("job", {"seq": seq}, str(seq)))

        async def follower(after: int) -> list[int]:
            got = []
            async for data in feed.follow(after):
                got += [int(i) for i in re.findall(rb"^id: (\d+)$", data, re.MULTILINE)]  # a chunk may hold several
            return got

        tasks = [asyncio.create_task(follower(after)) for after in (0, 2, 3, 5)]
        await asyncio.sleep(0)
        for seq in (4, 5, 6):
            feed.publish(seq, frame("job", {"seq": seq}, str(seq)))
            await asyncio.sleep(0)
        feed.publish(6, b"a replay of 6 is ignored")
        feed.close()
        return [await t for t in tasks], feed._seqs

    results, seqs = asyncio.run(scenario())
    assert results == [[1, 2, 3, 4, 5, 6], [3, 4, 5, 6], [4, 5, 6], [6]]
    assert seqs == [1, 2, 3, 4, 5, 6]


def test_a_bounded_feed_keeps_the_newest_frames() -> None:
    feed = Feed(keep=3)
    for seq in range(1, 11):
        feed.publish(seq, str(seq).encode())
    feed.close()
    assert feed.last_seq == 10
    assert b"".join(_collect(feed, 0, 100)).endswith(b"8910")
    assert _collect(feed, 9, 100) == [b"10"]


def test_a_cancelled_follower_does_not_disturb_the_others() -> None:
    async def scenario() -> list[bytes]:
        feed = Feed()

        async def read_one() -> list[bytes]:
            async for data in feed.follow(0):
                return [data]
            return []

        doomed = asyncio.create_task(read_one())
        survivor = asyncio.create_task(read_one())
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.sleep(0)
        feed.publish(1, b"one")
        return await survivor

    assert asyncio.run(scenario()) == [b"one"]


def test_frames_are_one_json_line_with_the_sequence_as_id_and_no_nan() -> None:
    ev = pb.RetrainEvent(job_id="job-1", sequence=7, state=pb.JOB_STATE_RUNNING,
                         progress=wpb.TrainEvent(epoch=wpb.EpochFinished(epoch=2, total_epochs=5, loss=0.5,
                                                                          validation_rmse=float("nan"))))
    data = event_to_dict(ev)
    assert data["kind"] == "epoch" and data["validation_rmse"] is None and data["text"].startswith("epoch 2/5")
    raw = frame("job", {**data, "text": "a\nb </script>"}, "7").decode()
    head, body, end = raw.split("\n", 2)[0], raw.split("\n")[2], raw[-2:]
    assert head == "id: 7" and body.startswith("data: {") and end == "\n\n"
    assert raw.count("\n") == 4  # the newline inside the text is escaped in JSON


@pytest.mark.parametrize("env, message", [
    ({"AQIMODELS_DASHBOARD_PORT": "http"}, "AQIMODELS_DASHBOARD_PORT"),
    ({"AQIMODELS_DASHBOARD_PORT": "70000"}, "AQIMODELS_DASHBOARD_PORT"),
    ({"AQIMODELS_DASHBOARD_HOST": "0.0.0.0"}, "beyond loopback without TLS"),
    ({"AQIMODELS_DASHBOARD_TLS_CERT": "/nonexistent.pem"}, "go together"),
    ({"AQIMODELS_DASHBOARD_SECRET": "short"}, "AQIMODELS_DASHBOARD_SECRET"),
])
def test_bad_settings_stop_the_dashboard_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(DashboardConfigError, match=message):
        DashboardConfig.from_env(env)


def test_settings_from_the_environment_and_the_command_line() -> None:
    c = DashboardConfig.from_env({"AQIMODELS_DASHBOARD_PORT": "9000"}, target="h:1", port=None)
    assert (c.host, c.port, c.target, c.tls) == ("127.0.0.1", 9000, "h:1", False)
    assert DashboardConfig.from_env({"AQIMODELS_DASHBOARD_PORT": "9000"}, port=0).port == 0
    assert DashboardConfig.from_env({}).port == 8080


def test_a_heartbeat_makes_idle_followers_write_a_comment_line() -> None:
    async def scenario() -> list[bytes]:
        feed = Feed()
        got: list[bytes] = []

        async def follower() -> None:
            async for data in feed.follow(0):
                got.append(data)

        task = asyncio.create_task(follower())
        await asyncio.sleep(0)
        feed.heartbeat()
        await asyncio.sleep(0)
        feed.publish(1, b"id: 1\n\n")
        await asyncio.sleep(0)
        feed.close()
        await task
        return got

    assert asyncio.run(scenario()) == [b": ping\n\n", b"id: 1\n\n"]


def test_one_publish_reaches_fifty_followers_in_one_pass_and_a_stuck_one_holds_none_back() -> None:
    """The fan-out: one encoded frame, every follower woken by the same publish; a follower whose
    writes block (a slow browser) delays nobody else."""
    async def scenario() -> tuple[list[int], int]:
        feed = Feed()
        got = [0] * 50
        stuck = asyncio.Event()  # never set: the first follower's "write" never finishes

        async def follower(i: int) -> None:
            async for data in feed.follow(0):
                assert data == b"id: 1\n\n"  # the same bytes object for everyone: encoded once
                got[i] += 1
                if i == 0:
                    await stuck.wait()

        tasks = [asyncio.create_task(follower(i)) for i in range(50)]
        await asyncio.sleep(0)
        feed.publish(1, b"id: 1\n\n")
        await asyncio.sleep(0)  # one pass of the loop: no follower waits for another's turn
        after_one_pass = list(got)
        feed.close()
        await asyncio.gather(*tasks[1:])
        tasks[0].cancel()
        return after_one_pass, sum(got)

    after_one_pass, total = asyncio.run(scenario())
    assert after_one_pass == [1] * 50
    assert total == 50


def test_the_dashboard_process_keeps_its_start_up_heap_out_of_the_collectors_walks() -> None:
    """A full collection walked every object built at start (about 50,000: 26-85 ms with the event
    loop stopped, every SSE stream stalled at once, measured with 50 clients on one job);
    :func:`settle_heap` compiles the templates and freezes that heap before serving."""
    import gc

    from aqimodels.client.dashboard.server import _uvicorn, settle_heap

    server = _uvicorn(DashboardConfig(target="127.0.0.1:1", port=0))
    env = server.config.app.state.dashboard.env
    gc.collect()
    before = len(gc.get_objects())
    try:
        settle_heap(server)
        walked = len(gc.get_objects())
        assert gc.get_freeze_count() > before // 2
        assert walked < before // 10
        assert set(env.list_templates()) <= {t.name for t in env.cache.values()}  # compiled before serving
    finally:
        gc.unfreeze()


def test_a_long_page_render_lets_the_event_loop_run_between_slices_and_is_sent_whole() -> None:
    """A big page's render (tens of ms at 1,000 versions) must not hold up the loop's SSE fan-out."""
    import time

    from aqimodels.client.dashboard.app import PageResponse

    async def scenario() -> tuple[int, list[dict[str, object]]]:
        def generate() -> Iterator[str]:
            for _ in range(40):  # 40 pieces of 1 ms of work each: 40 ms in one piece would stall the loop
                t = time.perf_counter()
                while time.perf_counter() - t < 0.001:
                    pass
                yield "<p>é</p>" * 25

        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        sent: list[dict[str, object]] = []

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        await PageResponse(generate, 404)({"type": "http", "method": "GET"}, receive, send)  # type: ignore[arg-type]
        task.cancel()
        return ticks - before, sent

    ticks_during_render, sent = asyncio.run(scenario())
    assert ticks_during_render >= 5  # the loop ran between slices (one tick per slice of about 2 ms)
    start, body = sent[0], sent[1]
    headers = dict(start["headers"])  # type: ignore[call-overload]
    assert start["status"] == 404
    assert body["body"] == ("<p>é</p>" * 1000).encode()
    assert headers[b"content-length"] == str(len("<p>é</p>".encode()) * 1000).encode()
    assert headers[b"cache-control"] == b"no-store"
    assert [k for k, _ in start["headers"]].count(b"content-length") == 1  # type: ignore[attr-defined]
